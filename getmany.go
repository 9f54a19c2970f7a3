// GetMany: ids to keys, the batch loader and per-key errors, around the
// steps of door.go it shares with Get.

package cacheaside

import (
	"context"
	"errors"
	"time"
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
// of its result. ErrNotFound (or an error Options.IsNotFound accepts) says
// that none of the ids exist, and each gets a tombstone. Any other error
// fails every id of the call and is cached for none. ctx follows the same
// rules as a Loader's.
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
//
// opts, at most one, are the call's own choices for every id (see
// GetOptions); an invalid one is returned before any I/O.
func GetMany[K comparable, T any](ctx context.Context, c *Cache[T], ids []K, key func(K) string, load BatchLoader[K, T], opts ...GetOptions) (map[K]T, error) {
	switch {
	case c == nil:
		return nil, errNilBatch("argument c (the *Cache)")
	case key == nil:
		return nil, errNilBatch("argument key (the func(K) string building each key)")
	case load == nil:
		return nil, errNilBatch("argument load (the BatchLoader)")
	}
	per, err := c.perCall(opts)
	if err != nil {
		return nil, err
	}
	if c.opts.Tracer == nil {
		return getMany(ctx, c, ids, key, load, per)
	}
	call := Call{Kind: callGetMany, Cache: c.name, Keys: len(ids)}
	ctx = c.opts.Tracer.Start(ctx, call)
	m, err := getMany(ctx, c, ids, key, load, per)
	c.opts.Tracer.End(ctx, call, err)
	return m, err
}

func getMany[K comparable, T any](ctx context.Context, c *Cache[T], ids []K, key func(K) string, load BatchLoader[K, T], per GetOptions) (map[K]T, error) {
	if c.closed.Load() {
		return nil, ErrClosed
	}
	var (
		errs   []error
		items  = make([]batchItem[K, T], 0, len(ids)) // one per distinct valid key; never grows past len(ids), so pointers into it hold
		ops    []*keyOp[T]                            // the keys the local tier did not answer; op.idx indexes items
		bypass []*keyOp[T]                            // the keys whose invalidation is pending (retry.go)
		direct []*keyOp[T]                            // NoStore with Reload: loaded, nothing read or stored (percall.go)
		byKey  = make(map[string]int, len(ids))       // index in items, or -1 for an invalid key
	)
	for _, id := range ids {
		k := key(id)
		if i, dup := byKey[k]; dup {
			if i >= 0 {
				items[i].more = append(items[i].more, id)
			}
			continue
		}
		ns, err := c.keyNS(k)
		vk := verKeys{ns: ns}
		var li *localItem[T]
		pre := fromRedis
		if err == nil {
			if pre, li = c.before(ctx, k, ns, 0, per); pre != fromLocal {
				err = c.tagsOf(k, &vk)
			}
		}
		if err != nil {
			byKey[k] = -1
			errs = append(errs, &KeyError{Key: k, Err: err})
			continue
		}
		byKey[k] = len(items)
		items = append(items, batchItem[K, T]{id: id, op: keyOp[T]{key: k, vk: vk, idx: len(items)}})
		it := &items[len(items)-1]
		switch pre {
		case fromSource:
			bypass = append(bypass, &it.op)
		case fromLoader:
			direct = append(direct, &it.op)
		case fromLocal:
			it.set(li.v, notFoundErr(li.notFound))
		default:
			ops = append(ops, &it.op)
		}
	}
	src := source[T]{many: func(ctx context.Context, idx []int) ([]T, []bool, error) {
		want := make([]K, len(idx))
		for i, j := range idx {
			want[i] = items[j].id
		}
		m, err := load(reloadingBatch[K, T](ctx, idx, want), want)
		if err != nil {
			return nil, nil, err
		}
		vals, found := make([]T, len(idx)), make([]bool, len(idx))
		for i, id := range want {
			vals[i], found[i] = m[id]
		}
		return vals, found, nil
	}, per: per}

	if len(ops) > 0 {
		start := c.flights.Load()
		for _, op := range ops {
			c.prepare(op, start)
		}
		t0 := time.Now()
		c.readMany(ctx, ops)
		spent := time.Since(t0)
		var misses []*keyOp[T]
		var readErrs errorOnce
		for _, op := range ops {
			miss, v, err := c.settled(ctx, op, spent, src, &readErrs)
			if miss {
				misses = append(misses, op)
			} else {
				items[op.idx].set(v, err)
			}
		}
		readErrs.report(ctx, c, "get")
		c.missed(ctx, misses, src)
		for _, op := range misses {
			if src.per.NoStore {
				items[op.idx].set(op.res, op.err) // loaded by missed
				continue
			}
			items[op.idx].set(c.await(ctx, op, src))
		}
	}

	if len(bypass) > 0 {
		c.bypass(ctx, bypass, src)
		for _, op := range bypass {
			items[op.idx].set(op.res, op.err)
		}
	}
	if len(direct) > 0 {
		c.loadNoStore(ctx, direct, src)
		for _, op := range direct {
			items[op.idx].set(op.res, op.err)
		}
	}

	out := make(map[K]T, len(ids))
	for i := range items {
		it := &items[i]
		switch {
		case it.err == nil:
			out[it.id] = it.v
			for _, id := range it.more {
				out[id] = it.v
			}
		case !errors.Is(it.err, ErrNotFound):
			errs = append(errs, &KeyError{Key: it.op.key, Err: it.err})
		}
	}
	return out, errors.Join(errs...)
}

// batchItem is one distinct key of a GetMany: the ids that map to it
// (loaded as id), its way through the engine, and its outcome.
type batchItem[K comparable, T any] struct {
	id   K
	more []K // duplicate ids with the same key
	op   keyOp[T]
	v    T
	err  error
}

func (it *batchItem[K, T]) set(v T, err error) { it.v, it.err = v, err }

// notFoundErr is ErrNotFound when notFound holds, else nil.
func notFoundErr(notFound bool) error {
	if notFound {
		return ErrNotFound
	}
	return nil
}
