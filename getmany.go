// GetMany's door: ids to keys, the batch loader, per-key errors.

package cacheaside

import (
	"context"
	"errors"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// Batches. GetMany is Get for many ids at once, with the same entry
// protocol per key: the same entries, leases, tombstones and in-process
// flights, so a batch and single Gets of the same key share one load. What
// it batches is the I/O: one read for all keys, one pipeline of lease
// scripts for the misses, one loader call for everything this caller ends
// up loading, one pipeline of fills.

// BatchLoader loads the values for ids from the source of truth in one
// call. Ids missing from the returned map do not exist: GetMany caches a
// tombstone for each (within the policy's NegativeTTL) and leaves them out
// of its result. An error fails every id of the call and is cached for
// none. ctx follows the same rules as a Loader's.
type BatchLoader[K comparable, T any] func(ctx context.Context, ids []K) (map[K]T, error)

// GetMany returns the values for ids, loading the ones Redis does not have
// with one call of load. key maps an id to its cache key (usually a
// Keyspace or Namespace method).
//
// Hits cost one round trip: one MGET (one per node, pipelined, on Redis
// Cluster or a Ring), with the namespace generations of a namespaced cache
// in the same read. For the misses, GetMany takes a lease per key (one
// pipeline), calls load once with the ids it holds leases for, and fills
// them (one pipeline). Per key it behaves like Get: a key another Get or
// GetMany of this process is loading is joined rather than loaded again; a
// key another process holds the lease on is waited for, as Get waits;
// stale and early-refresh rules apply to each hit.
//
// The result holds every id that has a value. Ids that do not exist (a
// tombstone, or left out by load) are absent from it and are not errors.
// The error joins a *KeyError for each key that failed: an invalid key
// (ErrInvalidKey), load's error for the ids it was loading, ctx's error for
// the keys not done when ctx ended, ErrRedisUnavailable under FailClosed;
// the other keys are still in the result. Redis failures are handled as
// Get handles them: under FailOpen the ids go to load, uncached, within
// MaxLoadsWhileDown (one slot per batch). Duplicate ids, or ids with the
// same key, are read and loaded once.
func GetMany[K comparable, T any](ctx context.Context, c *Cache[T], ids []K, key func(K) string, load BatchLoader[K, T]) (map[K]T, error) {
	if c == nil || key == nil || load == nil {
		return nil, errNilBatch
	}
	if c.closed.Load() {
		return nil, ErrClosed
	}
	out := make(map[K]T, len(ids))
	var errs []error
	items := make([]*batchItem[K, T], 0, len(ids))
	byKey := make(map[string]*batchItem[K, T], len(ids))
	for _, id := range ids {
		k := key(id)
		if it, dup := byKey[k]; dup {
			it.ids = append(it.ids, id)
			if it.local != nil && !it.local.notFound {
				out[id] = it.local.v
			}
			continue
		}
		genKey, err := c.checkKey(k)
		if err != nil {
			errs = append(errs, &KeyError{Key: k, Err: err})
			byKey[k] = &batchItem[K, T]{key: k}
			continue
		}
		it := &batchItem[K, T]{ids: []K{id}, key: k, genKey: genKey}
		byKey[k] = it
		if l := c.local; l != nil {
			if li, ok := l.lookup(k, c.opts.Clock().UnixNano()); ok {
				c.countLocal(0, li.notFound)
				if !li.notFound {
					out[id] = li.v
				}
				it.local = li
				continue
			}
			it.snap = l.snap(k, genKey)
		}
		items = append(items, it)
	}
	if len(items) == 0 {
		return out, errors.Join(errs...)
	}

	start := c.flights.Load()
	for _, it := range items {
		if f, ok := c.inflight.Load(it.key); ok {
			it.seen = flightSeen{f.(*flightState), f.(*flightState).observing.Load()}
		}
	}
	readMany(ctx, c, items)
	if cerr := ctx.Err(); cerr != nil {
		for _, it := range items {
			errs = append(errs, &KeyError{Key: it.key, Err: cerr})
		}
		return out, errors.Join(errs...)
	}

	now := c.opts.Clock()
	var misses []*batchItem[K, T]
	var failed errorOnce
	for _, it := range items {
		if it.err != nil {
			if isWrongType(it.err) {
				c.corrupt(ctx, it.key, nil, it.err)
				c.count(0, outMiss)
				misses = append(misses, it)
				continue
			}
			c.count(0, outMiss)
			failed.add(it.key, it.err)
			if c.opts.OnRedisDown == FailClosed {
				errs = append(errs, &KeyError{Key: it.key, Err: unavailable(it.err)})
				continue
			}
			it.down = true
			misses = append(misses, it)
			continue
		}
		it.vw = c.classify(ctx, it.key, it.b, it.gv, now)
		it.b = nil
		switch it.vw.state {
		case stFresh:
			c.count(0, outHit)
			c.keepLocal(it.key, &it.vw, now, it.snap)
			it.put(out, it.vw.v)
			if it.vw.e.Kind == envelope.Value && c.refreshEarly(&it.vw.e, now) {
				c.refreshAsync(ctx, it.key, it.genKey, one(load, it.ids[0]), it.vw.e)
			}
			continue
		case stStale:
			c.count(0, outStale)
			it.put(out, it.vw.v)
			if it.vw.e.Kind == envelope.Value {
				c.refreshAsync(ctx, it.key, it.genKey, one(load, it.ids[0]), it.vw.e)
			}
			continue
		case stNotFound:
			c.count(0, outNegative)
			c.keepLocal(it.key, &it.vw, now, it.snap)
			continue
		}
		c.count(0, outMiss)
		misses = append(misses, it)
	}
	failed.report(ctx, c, "get")
	if len(misses) == 0 {
		return out, errors.Join(errs...)
	}
	if h := c.hooks; h != nil && h.afterMiss != nil {
		for _, it := range misses {
			h.afterMiss(it.key)
		}
	}

	// Join the in-process flight of each missing key, or start one; the
	// flights this batch leads are loaded together.
	var owned []*batchItem[K, T]
	for _, it := range misses {
		var tok *envelope.Token
		if it.vw.e.Token != (envelope.Token{}) {
			tok = &it.vw.e.Token
		}
		it.trusted = it.seen.joinable(tok)
		it.call, it.leader = c.group.Join(it.key)
		if it.leader {
			it.fs = c.startFlight(it.key)
			owned = append(owned, it)
		}
	}
	if len(owned) > 0 {
		if c.enter() {
			go loadBatch(ctx, c, owned, load)
		} else {
			for _, it := range owned {
				finish(c, it, answer[T]{}, ErrClosed)
			}
		}
	}

	for _, it := range misses {
		select {
		case <-it.call.Done():
		case <-ctx.Done():
			errs = append(errs, &KeyError{Key: it.key, Err: ctx.Err()})
			continue
		}
		a, err := it.call.Result()
		v := a.v
		if !it.leader {
			v, err = c.joined(ctx, it.key, it.genKey, one(load, it.ids[0]), a, err, it.seen, it.trusted, it.down, 0, start)
		}
		switch {
		case err == nil:
			it.put(out, v)
		case errors.Is(err, ErrNotFound):
		default:
			errs = append(errs, &KeyError{Key: it.key, Err: err})
		}
	}
	return out, errors.Join(errs...)
}

// batchItem is one distinct key of a GetMany.
type batchItem[K comparable, T any] struct {
	ids    []K // the ids that map to key; loaded as ids[0]
	key    string
	genKey string
	local  *localItem[T] // found in the local tier
	snap   localSnap     // the local tier's epochs before the read

	// the read
	b    []byte
	gv   genView
	err  error
	vw   view[T]
	down bool // the read failed: load without Redis

	// the in-process flight
	seen    flightSeen
	trusted bool
	call    *flight.Call[answer[T]]
	leader  bool
	fs      *flightState // when leader

	// the load (loadBatch)
	tok  envelope.Token
	gen  envelope.Gen
	held bool
	done bool
}

func (it *batchItem[K, T]) put(out map[K]T, v T) {
	for _, id := range it.ids {
		out[id] = v
	}
}

// one turns a batch loader into the Loader of a single id, for what runs
// per key: background refreshes, and a key another process is loading.
func one[K comparable, T any](load BatchLoader[K, T], id K) Loader[T] {
	return func(ctx context.Context) (T, error) {
		m, err := load(ctx, []K{id})
		if err != nil {
			var zero T
			return zero, err
		}
		v, ok := m[id]
		if !ok {
			return v, ErrNotFound
		}
		return v, nil
	}
}
