// Reads and classification: GET, MGET and pipelined reads, and what an
// entry means (fresh, stale, tombstone, lease, miss).

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// read fetches the bytes under key (nil when absent) and the generation
// its version keys give (a namespace's, or its tags'), in one round trip.
func (c *Cache[T]) read(ctx context.Context, key string, vk verKeys) (b []byte, gv genView, err error) {
	if c.reads != nil {
		if !c.reads.begin() {
			return c.readCoalesced(ctx, key, vk)
		}
		defer c.reads.end()
	}
	return c.readDirect(ctx, key, vk)
}

// readDirect is read on the wire alone, not coalesced.
func (c *Cache[T]) readDirect(ctx context.Context, key string, vk verKeys) (b []byte, gv genView, err error) {
	switch {
	case len(vk.tags) > 0:
		// One MGET, or on a client that shards one GET per key in a
		// pipeline (readKeys): tags live in other slots.
		vals, errs := c.readKeys(ctx, vk.with(key))
		if err = errors.Join(errs...); err != nil {
			return nil, genView{versioned: true}, err
		}
		return vals[0], vk.view(vals[1:]), nil
	case vk.ns == "":
		b, err = c.guard.Get(ctx, key).Bytes()
		if errors.Is(err, redis.Nil) {
			return nil, gv, nil
		}
		return b, gv, err
	}
	gv.versioned = true
	vals, err := c.guard.MGet(ctx, key, vk.ns).Result()
	if err != nil {
		return nil, gv, err
	}
	if len(vals) != 2 {
		return nil, gv, errReplyLength("MGET", len(vals), 2)
	}
	b, gv = namespacedRead(vals)
	return b, gv, nil
}

// namespacedRead decodes the reply to MGET of an entry and its namespace
// generation key.
func namespacedRead(vals []any) (b []byte, gv genView) {
	if s, ok := vals[0].(string); ok {
		b = []byte(s)
	}
	g, _ := vals[1].(string)
	return b, nsGen(g)
}

// corrupt counts and reports undecodable bytes under key and returns the
// token the load may use to overwrite them (nil when the header itself is
// foreign, which acquire.lua overwrites on its own).
func (c *Cache[T]) corrupt(ctx context.Context, key string, b []byte, err error) []byte {
	c.ev.decodeError(ctx)
	c.report(ctx, "decode", key, fmt.Errorf("%w: %w", ErrCorruptEntry, err))
	if len(b) >= envelope.HeaderSize && b[0] == envelope.Magic && b[1] == envelope.Version {
		return b[envelope.TokenOffset : envelope.TokenOffset+envelope.TokenSize]
	}
	return nil
}

// isWrongType reports a WRONGTYPE reply: the key holds a non-string.
func isWrongType(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "WRONGTYPE")
}

// maxMGet is the most keys one MGET carries; a larger batch sends several
// in one pipeline.
const maxMGet = 1000

// readMany reads the entries of ops, and their version keys (namespace
// generations, tags), in one round trip: one MGET, or one GET per key in a
// pipeline where a multi-key command would cross slots.
func (c *Cache[T]) readMany(ctx context.Context, ops []*keyOp[T]) {
	keys := make([]string, 0, len(ops))
	gens := map[string]int{}
	for _, it := range ops {
		keys = append(keys, it.key)
	}
	for _, it := range ops {
		for _, k := range it.vk.keys() {
			if _, ok := gens[k]; !ok {
				gens[k] = len(keys)
				keys = append(keys, k)
			}
		}
	}
	vals, errs := c.readKeys(ctx, keys)
	for i, it := range ops {
		it.b, it.rerr = vals[i], errs[i]
		if !it.vk.versioned() {
			continue
		}
		vks := it.vk.keys()
		gv := make([][]byte, len(vks))
		for n, k := range vks {
			j := gens[k]
			if it.rerr == nil {
				it.rerr = errs[j]
			}
			gv[n] = vals[j]
		}
		it.gv = it.vk.view(gv)
	}
}

// readKeys reads keys in one round trip and returns, for each, its bytes
// (nil when absent or not a string) or the error of its read.
func (c *Cache[T]) readKeys(ctx context.Context, keys []string) ([][]byte, []error) {
	vals := make([][]byte, len(keys))
	errs := make([]error, len(keys))
	split := c.splitReads.Load()
	if !split && len(keys) <= 50 { // one command's budget is enough
		res, err := c.guard.MGet(ctx, keys...).Result()
		if isCrossSlot(err) {
			// A client that shards (a wrapped Cluster client, say): read
			// per key from now on.
			c.splitReads.Store(true)
			split = true
		} else {
			mgetInto(vals, errs, 0, res, err)
			return vals, errs
		}
	}
	// One GET per key (split), or one MGET per maxMGet keys, routed by
	// its first key.
	route := keys
	if !split {
		route = nil
		for i := 0; i < len(keys); i += maxMGet {
			route = append(route, keys[i])
		}
	}
	cmds, err := c.guard.pipe(ctx, c.guard.batchBudget(len(keys)), reads, route, func(p redis.Pipeliner, i int) redis.Cmder {
		if split {
			return p.Get(ctx, keys[i])
		}
		return p.MGet(ctx, keys[i*maxMGet:min((i+1)*maxMGet, len(keys))]...)
	})
	if !split {
		for _, cmd := range cmds {
			if cmd != nil && isCrossSlot(cmd.Err()) {
				c.splitReads.Store(true)
				return c.readKeys(ctx, keys)
			}
		}
	}
	for i, cmd := range cmds {
		switch cmd := cmd.(type) {
		case nil: // not sent
			if split {
				errs[i] = unsentErr(cmds, err)
			} else {
				mgetInto(vals, errs, i*maxMGet, nil, unsentErr(cmds, err))
			}
		case *redis.StringCmd:
			b, err := cmd.Bytes()
			if err == nil {
				vals[i] = b
			} else if !errors.Is(err, redis.Nil) {
				errs[i] = err
			}
		case *redis.SliceCmd:
			res, err := cmd.Result()
			mgetInto(vals, errs, i*maxMGet, res, err)
		}
	}
	return vals, errs
}

// mgetInto stores the reply of an MGET of the keys from off on.
func mgetInto(vals [][]byte, errs []error, off int, res []any, err error) {
	if err == nil && len(res) != min(len(vals)-off, maxMGet) {
		err = errReplyLength("MGET", len(res), min(len(vals)-off, maxMGet))
	}
	if err != nil {
		for i := off; i < min(off+maxMGet, len(vals)); i++ {
			errs[i] = err
		}
		return
	}
	for i, r := range res {
		if s, ok := r.(string); ok {
			vals[off+i] = []byte(s)
		}
	}
}

func isCrossSlot(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "CROSSSLOT")
}

// state is what a read found under a key, as far as Get is concerned.
type state uint8

const (
	stMiss     state = iota // absent, undecodable, or of an older namespace generation
	stLease                 // being loaded, nothing to serve
	stFresh                 // a value inside its TTL
	stStale                 // past its TTL, inside the stale-while-revalidate window
	stReload                // past every serving window: reload now
	stNotFound              // a "not found" tombstone
)

// view is one read, decoded.
type view[T any] struct {
	state   state
	v       T              // the value, for stFresh, stStale and stReload
	e       envelope.Entry // its header; e.Payload is not kept
	staleOK bool           // stReload: still inside the stale-if-error window
	replace []byte         // stMiss: token acquire.lua may overwrite, if undecodable
}

// genView is the generation a read saw: a namespace's, or the digest of
// an entry's tags' (tags.go).
type genView struct {
	versioned bool         // the cache uses namespaces or tags
	known     bool         // the namespace (every tag) has a generation; without one nothing is current
	gen       envelope.Gen // the generation an entry must carry to be current
}

// nsGen is the one decoder of a namespace generation as Redis returns it
// (a GET or MGET of the generation key, or acquire.lua's reply): s is the
// generation when it has the generation's size, and anything else (absent,
// or bytes written by hand) means the namespace has none.
func nsGen[S string | []byte](s S) genView {
	gv := genView{versioned: true}
	if len(s) == envelope.GenSize {
		copy(gv.gen[:], s)
		gv.known = true
	}
	return gv
}

// classify decodes the bytes b read under key (nil: absent) at time now.
// Undecodable bytes are counted and reported here.
func (c *Cache[T]) classify(ctx context.Context, key string, b []byte, gv genView, now time.Time) (vw view[T]) {
	if b == nil {
		return vw
	}
	if err := envelope.Decode(b, &vw.e); err != nil {
		vw.replace = c.corrupt(ctx, key, b, err)
		return vw
	}
	payload := vw.e.Payload
	vw.e.Payload = nil
	if gv.versioned && (!gv.known || vw.e.Gen != gv.gen) && (c.hooks == nil || !c.hooks.noTagCheck) {
		// Stamped with an older generation: a miss, and its token says
		// nothing about what is current (see flightSeen.joinable).
		vw.e = envelope.Entry{}
		return vw
	}
	switch vw.e.Kind {
	case envelope.Lease:
		vw.state = stLease
		return vw
	case envelope.NotFound:
		if soft := vw.e.SoftExpiry; soft != 0 && now.UnixMilli() >= soft {
			// Past its negative TTL by this cache's clock: normally Redis
			// has expired it by now, but its Redis TTL may be lost
			// (PERSIST, a restore without TTLs, an entry written by hand).
			// Reloaded, as a value past every window is, rather than "not
			// found" forever: acquire.lua may overwrite the entry with
			// this token.
			vw.replace = b[envelope.TokenOffset : envelope.TokenOffset+envelope.TokenSize]
			vw.e = envelope.Entry{}
			return vw
		}
		vw.state = stNotFound
		return vw
	}
	if vw.e.Format != c.opts.Codec.Format() {
		vw.replace = c.corrupt(ctx, key, b, fmt.Errorf("codec format %d, this cache uses %d", vw.e.Format, c.opts.Codec.Format()))
		return vw
	}
	var v T // decoded apart from vw, so only v (not all of vw) escapes to the heap
	if err := c.opts.Codec.Unmarshal(payload, &v); err != nil {
		vw.replace = c.corrupt(ctx, key, b, err)
		return vw
	}
	vw.v = v
	p := &c.opts.Policy
	ms := now.UnixMilli()
	soft := vw.e.SoftExpiry
	switch {
	case soft == 0 || ms < soft:
		vw.state = stFresh
	case ms < soft+p.StaleWhileRevalidate.Milliseconds():
		vw.state = stStale
	default:
		vw.state = stReload
		vw.staleOK = ms < soft+p.StaleIfError.Milliseconds()
	}
	return vw
}

// next is what a door does with one key after its first read.
type next uint8

const (
	serve  next = iota // the read answered: the value, or ErrNotFound for a tombstone
	miss               // the engine loads it (op.down: without Redis)
	failed             // the door returns the error
)

// settle classifies op's first read (op.b and op.gv, or op.rerr), counts
// it (unless count is false: a Get starting over), keeps a fresh answer in
// the local tier, and says what comes next. refresh reports a served value
// a background refresh should reload. Read failures go to errs, which the
// door reports once for all its keys. Get and GetMany both settle every
// read here.
func (c *Cache[T]) settle(ctx context.Context, op *keyOp[T], count bool, per GetOptions, errs *errorOnce) (n next, refresh bool, err error) {
	if op.rerr != nil {
		if count {
			c.ev.miss(ctx)
		}
		if isWrongType(op.rerr) {
			// Not a string: foreign data under our key. acquire.lua replaces it.
			c.corrupt(ctx, op.key, nil, op.rerr)
			return miss, false, nil
		}
		if cerr := ctx.Err(); cerr != nil {
			return failed, false, cerr // the caller's own deadline, not a Redis failure
		}
		errs.add(op.key, op.rerr)
		if starved(op.rerr) {
			// Read late by this process, not refused by Redis, which may
			// well have answered: go on with Redis, to the lease round.
			return miss, false, nil
		}
		if c.opts.Degradation.OnRedisDown == FailClosed {
			return failed, false, unavailable(op.rerr)
		}
		op.down = true
		return miss, false, nil
	}
	now := c.opts.Clock()
	vw := c.classify(ctx, op.key, op.b, op.gv, now)
	if per.Reload {
		vw = reloadNow(vw)
	}
	op.see(vw)
	op.b = nil
	switch op.vw.state {
	case stFresh:
		if count {
			c.ev.hit(ctx)
		}
		if !per.SkipLocal {
			c.keepLocal(op.key, &op.vw, now, op.snap)
		}
		return serve, op.vw.e.Kind == envelope.Value && c.refreshEarly(&op.vw.e, now), nil
	case stStale:
		if count {
			c.ev.staleHit(ctx)
		}
		return serve, op.vw.e.Kind == envelope.Value || holderGone(&op.vw.e), nil
	case stNotFound:
		if count {
			c.ev.negativeHit(ctx)
		}
		if !per.SkipLocal {
			c.keepLocal(op.key, &op.vw, now, op.snap)
		}
		return serve, false, ErrNotFound
	}
	// Absent, being loaded, undecodable, of an older namespace generation,
	// or due for a reload: the engine sorts it out.
	if count {
		c.ev.miss(ctx)
	}
	return miss, false, nil
}

// holderGone reports whether a refreshing entry's lease deadline (server
// time, milliseconds mod 2^32, in the load-time field; see refresh.lua)
// looks past by this machine's clock. It is only a hint for when to try
// taking the refresh over; refresh.lua decides by Redis's clock.
func holderGone(e *envelope.Entry) bool {
	return e.Kind == envelope.Refreshing && int32(uint32(time.Now().UnixMilli())-e.LoadMillis) > 0
}
