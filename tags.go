// Tags and Clear: invalidating every entry that carries a tag, or every
// entry of a Cache, with one write, whatever their number and slots.

package cacheaside

import (
	"cmp"
	"context"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime/debug"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// Tags. A tag is a group of entries that one call invalidates: a task-list
// page carries the tags of its org and of its assignee, and a change to
// either invalidates every page that shows it, without knowing their keys.
// Options.Tags gives each key its tags, so every reader of a key knows
// them before it reads.
//
// Each tag has a generation: 8 random bytes under its own key
// ("cacheaside:tag:<Name>:<tag>"). An entry is stamped, in the header
// field namespaces use (envelope.Entry.Gen), with a 64-bit digest of the
// generations of its tags as its load read them before reading the
// source. A Get reads the entry and its tags' generations in one round
// trip (one MGET; on Cluster, where tags live in other slots, one
// pipeline of GETs, one round trip per node), and an entry whose stamp is
// not the digest of what it read is a miss, as an entry of an older
// namespace generation is. InvalidateTags writes each tag a new random
// generation: one SET per tag, whatever the number of entries, and the
// entries die lazily when next read. A tag whose generation key is absent
// (never created, expired, evicted) matches no entry, so losing a
// generation key costs one reload per entry, never a stale read; a load
// creates the generations it needs (lua/tag.lua) before it takes its
// lease.
//
// Clear is a tag every entry of a Clearable cache carries
// ("cacheaside:clear:<Name>").
//
// Unlike a namespace's generation, a tag's lives in another slot than the
// entry on Cluster, so the lease scripts cannot compare it atomically with
// the entry: the lease takes the caller's digest as an argument (an entry
// with another digest is dead to acquire.lua), and a fill is not checked
// against the tags at all. A fill that lands after a tag's invalidation
// therefore writes an entry that is already dead, and what keeps a Get
// from returning the value of a load that began before an invalidation is
// the reader's check, done again after joining an in-process load
// (Cache.holds): in a tagged cache no step of a load vouches for its
// answer (answer.round is 0).

//go:embed lua/tag.lua
var tagLua string
var tagScript = redis.NewScript(tagLua)

// maxTags is the most tags Options.Tags may give one key.
const maxTags = 16

// Key prefixes of tag generations and of a cache's Clear generation.
const (
	tagKeyPrefix   = wire.TagKeyPrefix
	clearKeyPrefix = wire.ClearKeyPrefix
)

// verKeys are the keys whose values decide whether an entry is current:
// its namespace's generation key, or its tags' generation keys (with the
// cache's Clear key). A cache has one kind or the other, or neither.
type verKeys struct {
	ns   string   // the namespace's generation key, in the entry's slot; checked by the lease scripts too
	tags []string // the generation keys of its tags; checked by readers (see above)
}

// versioned reports whether an entry's stamp must match what a read of
// these keys finds.
func (v verKeys) versioned() bool { return v.ns != "" || len(v.tags) > 0 }

// keys returns the version keys.
func (v verKeys) keys() []string {
	if v.ns != "" {
		return []string{v.ns}
	}
	return v.tags
}

// with returns key followed by the version keys: what a read fetches.
func (v verKeys) with(key string) []string {
	switch {
	case v.ns != "":
		return []string{key, v.ns}
	case len(v.tags) > 0:
		return append([]string{key}, v.tags...)
	}
	return []string{key}
}

// view turns the values read under the version keys (in the order of
// with, without the entry) into the generation an entry must carry.
func (v verKeys) view(vals [][]byte) genView {
	switch {
	case v.ns != "":
		return nsGen(vals[0])
	case len(v.tags) > 0:
		return tagView(vals)
	}
	return genView{}
}

// digest offsets and primes: 64-bit FNV-1a.
const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

// tagView is the generation an entry with tags whose generations are gens
// must carry: the FNV-1a digest of the generations in order. Any absent
// or malformed generation makes it unknown: nothing is current.
func tagView[S string | []byte](gens []S) genView {
	gv := genView{versioned: true}
	h := uint64(fnvOffset)
	for _, g := range gens {
		if len(g) != envelope.GenSize {
			return gv
		}
		for i := 0; i < len(g); i++ {
			h ^= uint64(g[i])
			h *= fnvPrime
		}
	}
	gv.known = true
	binary.BigEndian.PutUint64(gv.gen[:], h)
	return gv
}

// tagKeys returns the version keys of key in a tagged or Clearable cache.
// A panic in Options.Tags is returned as a *PanicError.
func (c *Cache[T]) tagKeys(key string) (keys []string, err error) {
	var tags []string
	if c.opts.Tags != nil {
		func() {
			defer func() {
				if r := recover(); r != nil {
					err = panicIn("Options.Tags", r, debug.Stack())
				}
			}()
			tags = c.opts.Tags(key)
		}()
		if err != nil {
			return nil, err
		}
	}
	if len(tags) > maxTags {
		return nil, fmt.Errorf("%w: Options.Tags gave %q %d tags; at most %d", ErrInvalidKey, key, len(tags), maxTags)
	}
	n := len(tags)
	if c.opts.Clearable {
		n++
	}
	keys = make([]string, 0, n)
	for _, t := range tags {
		if err := checkTag(t, c.opts.MaxKeySize); err != nil {
			return nil, fmt.Errorf("%w (Options.Tags for key %q)", err, key)
		}
		keys = append(keys, c.tagKey(t))
	}
	if c.opts.Clearable {
		keys = append(keys, c.clearKey())
	}
	return keys, nil
}

// checkTag validates one tag.
func checkTag(tag string, max int) error {
	if tag == "" {
		return fmt.Errorf("%w: empty tag", ErrInvalidKey)
	}
	if len(tag) > max {
		return fmt.Errorf("%w: tag of %d bytes exceeds MaxKeySize %d", ErrInvalidKey, len(tag), max)
	}
	return nil
}

// tagKey is where tag's generation lives. Name and tag are escaped, so no
// two (Name, tag) pairs share a key.
func (c *Cache[T]) tagKey(tag string) string {
	return tagKeyPrefix + wire.EscapePart(c.name) + ":" + wire.EscapePart(tag)
}

// clearKey is where the generation Clear moves lives.
func (c *Cache[T]) clearKey() string { return clearKeyPrefix + wire.EscapePart(c.name) }

// tagCalls are lua/tag.lua's calls for keys: each tag's generation, made
// if it has none.
func (c *Cache[T]) tagCalls(keys []string) []scriptCall {
	calls := make([]scriptCall, len(keys))
	for i, k := range keys {
		g := newGen()
		calls[i] = scriptCall{s: tagScript, keys: []string{k}, args: []any{g[:], millis(c.leases.genTTL)}}
	}
	return calls
}

// tagGens makes sure each distinct tag key of vks has a generation,
// creating the absent ones (lua/tag.lua, one pipeline), and returns for
// each vks[i] the generation an entry loaded now must carry, or the error
// of one of its tags.
func (c *Cache[T]) tagGens(ctx context.Context, vks []verKeys) ([]genView, []error) {
	index := map[string]int{}
	var keys []string
	for _, vk := range vks {
		for _, k := range vk.tags {
			if _, ok := index[k]; !ok {
				index[k] = len(keys)
				keys = append(keys, k)
			}
		}
	}
	gvs := make([]genView, len(vks))
	errs := make([]error, len(vks))
	if len(keys) == 0 {
		return gvs, errs
	}
	cmds := c.leases.run(ctx, c.tagCalls(keys))
	for i, vk := range vks {
		mine := make([]*redis.Cmd, len(vk.tags))
		for j, k := range vk.tags {
			mine[j] = cmds[index[k]]
		}
		gvs[i], errs[i] = tagReplies(mine)
	}
	return gvs, errs
}

// tagReplies is the generation an entry carrying the tags whose tag.lua
// replies are cmds must carry (tagView), or the error of a reply.
func tagReplies(cmds []*redis.Cmd) (genView, error) {
	gens := make([]string, len(cmds))
	for j, cmd := range cmds {
		s, err := cmd.Text()
		if err != nil {
			return genView{}, err
		}
		gens[j] = s
	}
	gv := tagView(gens)
	if !gv.known {
		return gv, fmt.Errorf("tag generation of %d bytes", envelope.GenSize)
	}
	return gv, nil
}

// InvalidateTags invalidates every entry that carries any of tags, in
// O(1) per tag whatever the number of entries: it writes each tag a new
// random generation (one SET per tag, pipelined), so the entries stamped
// with the old one are misses from then on and are reloaded when next
// read; loads in flight that read the old generation fill entries that
// are already dead. It needs Options.Tags. Local tiers drop the tagged
// entries of this cache (all of them, in every process on the bus).
//
// An empty or oversized tag is an ErrInvalidKey error and nothing is
// invalidated. A Redis error is returned (and reported), and the
// invalidation is queued for retry (see Invalidate): until it lands, this
// process's Gets of entries carrying the tag load from the source.
func (c *Cache[T]) InvalidateTags(ctx context.Context, tags ...string) error {
	if c.opts.Tags == nil {
		return fmt.Errorf("%w: InvalidateTags on a cache without Options.Tags", ErrInvalidOptions)
	}
	keys := make([]string, 0, len(tags))
	for _, t := range tags {
		if err := checkTag(t, c.opts.MaxKeySize); err != nil {
			return err
		}
		keys = append(keys, c.tagKey(t))
	}
	return c.bumpTags(ctx, "invalidate-tags", keys)
}

// Clear invalidates every entry of the cache in O(1): it moves the
// generation every entry of a Clearable cache carries (one SET), and
// every local tier on the bus drops this cache's entries. It needs
// Options.Clearable. A Redis error is returned (and reported), and the
// Clear is queued for retry: until it lands, this process's Gets load
// from the source. Other caches, even on the same Redis, are untouched.
func (c *Cache[T]) Clear(ctx context.Context) error {
	if !c.opts.Clearable {
		return fmt.Errorf("%w: Clear on a cache without Options.Clearable", ErrInvalidOptions)
	}
	return c.bumpTags(ctx, "clear", []string{c.clearKey()})
}

// forgetTagged makes later Gets of keys carrying any of the generation
// keys start new loads instead of joining this process's loads in flight.
func (c *Cache[T]) forgetTagged(keys []string) {
	c.inflight.Range(func(k, _ any) bool {
		key := k.(string)
		tags, err := c.tagKeys(key)
		if err != nil {
			return true
		}
		for _, t := range tags {
			for _, b := range keys {
				if t == b {
					c.group.Forget(key)
					return true
				}
			}
		}
		return true
	})
}

// bumpGens gives each generation key a new random generation: one SET
// each, in one pipeline under the write budget. It returns each key's
// error.
func (c *Cache[T]) bumpGens(ctx context.Context, keys []string) []error {
	errs := make([]error, len(keys))
	if len(keys) == 1 {
		errs[0] = c.bumpGen(ctx, keys[0])
		return errs
	}
	cmds, err := c.guard.pipe(ctx, c.guard.writeBudget(len(keys)), writes, keys, func(p redis.Pipeliner, i int) redis.Cmder {
		g := newGen()
		return p.Set(ctx, keys[i], g[:], c.leases.genTTL)
	})
	for i, cmd := range cmds {
		switch {
		case cmd == nil:
			errs[i] = cmp.Or(err, unsentErr(cmds, err))
		case cmd.Err() != nil:
			errs[i] = cmd.Err()
		default:
			c.ev.bumped()
		}
	}
	return errs
}

// bumpTags gives each generation key a new random generation, queues the
// ones that failed for retry, and tells the local tiers.
func (c *Cache[T]) bumpTags(ctx context.Context, op string, keys []string) error {
	if len(keys) == 0 {
		return nil
	}
	if c.closed.Load() {
		return ErrClosed
	}
	var errs []error
	c.forgetTagged(keys)
	for i, err := range c.bumpGens(ctx, keys) {
		if err != nil {
			c.retryLater(retryNS, keys[i])
			errs = append(errs, c.redisError(ctx, op, keys[i], err))
		}
	}
	c.forgetTagged(keys) // again: loads that started before the SETs landed
	for _, k := range keys {
		if err := c.invalidatedNamespace(ctx, k); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
