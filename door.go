// The door: the steps Get and GetMany both take with each key above the
// miss engine, each written once here, in the order both take them.

package cacheaside

import (
	"context"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"time"
)

// The door. For each key, Get (one key) and GetMany (a batch) take these
// steps, in this order:
//
//  1. enter: ErrClosed after Close, then the key's checks (checkKey);
//  2. before: a key with a pending invalidation goes to the source (bypass),
//     and the local tier may answer;
//  3. prepare: the local tier's snapshot and the in-process flight the key
//     may join are noted before the read;
//  4. one read for every key left (readGet, which may share another Get's
//     queued read (shared.go), or readMany for a batch);
//  5. settled: a hit is served (and a refresh started if due), a failure
//     returned, anything else is a miss;
//  6. missed: the misses join or start in-process flights, whose leaders
//     run the engine (engine.go), and each key awaits its flight's answer.
//
// The differential test (differential_test.go) drives both doors through
// the same schedules and checks they agree.

// ahead is what a door does with a key before its Redis read.
type ahead uint8

const (
	fromRedis  ahead = iota // read it
	fromSource              // an invalidation of it is pending (retry.go): load from the source, bypassing the cache
	fromLocal               // the local tier answered
	fromLoader              // NoStore with Reload: load, reading and storing nothing (percall.go)
)

// before decides key (in the namespace whose generation key is ns, if
// any) before its Redis read, and counts what it decided unless the key's
// Get is a start-over (attempt > 0). It takes no keyOp: a local hit must
// not pay for building one, nor for the key's tags, which it reads only
// when an invalidation is pending.
func (c *Cache[T]) before(ctx context.Context, key, ns string, attempt int, per GetOptions) (ahead, *localItem[T]) {
	count := attempt == 0
	if c.retries.pending.Load() > 0 && c.pendingFor(key, ns) { // one atomic load while nothing is queued
		if count {
			c.ev.miss(ctx)
		}
		return fromSource, nil
	}
	if per.Reload && per.NoStore {
		if count {
			c.ev.miss(ctx)
		}
		return fromLoader, nil
	}
	if l := c.local; l != nil && !per.SkipLocal {
		if it, ok := l.lookup(key, l.now()); ok {
			if count {
				c.ev.localHit(ctx, it.notFound)
			}
			return fromLocal, it
		}
	}
	return fromRedis, nil
}

// prepare notes, before op's read, what the engine and the flights need
// to know of the time before it: the local tier's snapshot of the key, the
// flights begun so far (start, from one Load for a whole batch) and the
// flight of the key this read may join (see flightSeen.joinable).
func (c *Cache[T]) prepare(op *keyOp[T], start uint64) {
	if l := c.local; l != nil {
		op.snap = l.snap(op.key, op.vk)
	}
	op.start = start
	op.seen = c.seenFlight(op.key)
}

// settled decides op after its read, which took spent: a hit is served
// (miss false, with v and err; a due refresh starts in the background), a
// failure returned (miss false, err set), anything else is a miss, to be
// handed to missed. Failures to read are gathered in errs, to be reported
// once per read.
func (c *Cache[T]) settled(ctx context.Context, op *keyOp[T], spent time.Duration, src source[T], errs *errorOnce) (miss bool, v T, err error) {
	if h := c.hooks; h != nil && h.afterRead != nil {
		h.afterRead(op.key)
	}
	n, refresh, err := c.settle(ctx, op, op.attempt == 0, src.per, errs)
	switch n {
	case serve:
		if refresh && !src.per.NoStore { // a NoStore call writes nothing, a refresh included
			c.refreshAsync(ctx, op, src)
		}
		return false, op.vw.v, err
	case failed:
		return false, v, err
	}
	op.spent = spent
	return true, v, nil
}

// missed hands a door's misses to the in-process flights: each joins its
// key's flight or starts one, and the flights this caller leads go to the
// engine in one run. Each op then awaits its answer (await). A NoStore
// call's misses are loaded here, directly, and await returns their
// outcome.
func (c *Cache[T]) missed(ctx context.Context, ops []*keyOp[T], src source[T]) {
	if h := c.hooks; h != nil && h.afterMiss != nil {
		for _, op := range ops {
			h.afterMiss(op.key)
		}
	}
	if src.per.NoStore {
		c.loadNoStore(ctx, ops, src)
		return
	}
	c.join(ctx, ops, src)
}

// one is Get for one key: the body of Get, and the start-over of a key
// (of a Get or a GetMany) whose joined answer could not be trusted
// (attempt 1, not counted again). idx is the key's position for src.
func (c *Cache[T]) one(ctx context.Context, key string, idx int, src source[T], attempt int) (T, error) {
	var zero T
	if c.closed.Load() {
		return zero, ErrClosed
	}
	ns, err := c.keyNS(key)
	if err != nil {
		return zero, err
	}
	if src.one == nil && src.many == nil {
		return zero, errNilLoader
	}
	pre, it := c.before(ctx, key, ns, attempt, src.per)
	if pre == fromLocal {
		return it.v, notFoundErr(it.notFound)
	}
	vk := verKeys{ns: ns}
	if err := c.tagsOf(key, &vk); err != nil {
		return zero, err
	}
	switch pre {
	case fromSource:
		m := &keyOp[T]{key: key, vk: vk, idx: idx}
		c.bypass(ctx, []*keyOp[T]{m}, src)
		return m.res, m.err
	case fromLoader:
		m := &keyOp[T]{key: key, vk: vk, idx: idx}
		c.loadNoStore(ctx, []*keyOp[T]{m}, src)
		return m.res, m.err
	}
	op := keyOp[T]{key: key, vk: vk, idx: idx, attempt: attempt}
	c.prepare(&op, c.flights.Load())
	if op.seen.holding && !op.seen.stale && attempt == 0 && !src.per.NoStore {
		// This process holds key's lease and is loading it: join that load
		// without a read of its own. Its fill, sent after this point,
		// vouches for its answer (see joined); if the fill fails, a read
		// after the answer decides. A load that waits for another
		// process's holder is joined after a read, as its answer comes by
		// a wake message that cannot vouch for this Get. A Get that starts
		// over reads, and so does one whose load may answer with the old
		// value at the soft load timeout: the read can vouch for that.
		c.ev.miss(ctx)
		m := new(keyOp[T])
		*m = op
		c.missed(ctx, []*keyOp[T]{m}, src)
		return c.await(ctx, m, src)
	}
	spent, shared := c.readGet(ctx, &op)
	if sh := op.shared; sh != nil {
		defer sh.release(nil) // a hit, a failure or a panic: the others settle the read themselves
	}
	var errs errorOnce
	miss, v, err := c.settled(ctx, &op, spent, src, &errs)
	errs.report(ctx, c, "get")
	if !miss {
		return v, err
	}
	m := new(keyOp[T]) // the hit path keeps op on the stack
	*m = op
	if src.per.NoStore {
		m.shared = nil // the defer releases it: the Gets that shared the read settle it themselves
		c.missed(ctx, []*keyOp[T]{m}, src)
		return m.res, m.err
	}
	m.call = handed[T](shared)
	c.missed(ctx, []*keyOp[T]{m}, src)
	return c.await(ctx, m, src)
}

// pendingFor reports whether a queued invalidation covers key, in the
// namespace whose generation key is ns or by one of its tags.
func (c *Cache[T]) pendingFor(key, ns string) bool {
	vk := verKeys{ns: ns}
	if c.tagsOf(key, &vk) != nil {
		return false // the call fails on its tags later
	}
	return c.retries.covers(key, vk)
}

// checkKey validates key and returns its version keys: its namespace's
// generation key in a namespaced cache, its tags' (and Clear's) in a
// tagged or Clearable one.
func (c *Cache[T]) checkKey(key string) (verKeys, error) {
	ns, err := c.keyNS(key)
	vk := verKeys{ns: ns}
	if err == nil {
		err = c.tagsOf(key, &vk)
	}
	return vk, err
}

// keyNS is checkKey without the tags, what a local hit needs: it
// validates key and returns its namespace's generation key, if any.
func (c *Cache[T]) keyNS(key string) (string, error) {
	if err := checkKey(key, c.opts.MaxKeySize); err != nil {
		return "", err
	}
	if !c.opts.Namespaced {
		return "", nil
	}
	genKey, ok := wire.GenerationKey(key)
	if !ok {
		return "", fmt.Errorf("%w: %q has no namespace; a namespaced cache takes keys built with Namespace.Key", ErrInvalidKey, key)
	}
	return genKey, nil
}

// tagsOf fills in vk's tag keys, in a tagged or Clearable cache, unless
// they are there already.
func (c *Cache[T]) tagsOf(key string, vk *verKeys) error {
	if !c.tagged() || vk.tags != nil {
		return nil
	}
	tags, err := c.tagKeys(key)
	vk.tags = tags
	return err
}

// tagged reports whether entries of this cache carry tags (Options.Tags
// or Options.Clearable).
func (c *Cache[T]) tagged() bool { return c.opts.Tags != nil || c.opts.Clearable }
