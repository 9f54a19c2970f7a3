// Writes: Set (write-through) and invalidation by key, by prefix and by
// namespace. A failed invalidation is queued for retry (retry.go).

package cacheaside

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"strings"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// Invalidation. Entries and their leases share one key, so deleting the
// key is all it takes to drop a value and to revoke a load in flight: the
// loader's fill finds its token gone and writes nothing. Each method also
// makes later Gets in this process start a new load instead of joining one
// that began before the invalidation.

// Invalidate deletes keys with UNLINK, which also revokes any lease on
// them: a load that started before the call cannot fill afterwards. Call it
// after the write to the source of truth has committed. All keys are
// validated before anything is sent; several keys go in one pipeline (one
// round trip per node on Redis Cluster), under Degradation.WriteTimeout
// whatever their number. It returns how many of keys existed and were
// deleted, as InvalidatePrefix does.
//
// A Redis error (the breaker's skip included) is returned and reported,
// and the invalidation is queued: it is retried until it lands, and until
// then this process's Gets of keys bypass the cache and load from the
// source, so the writer reads its own write
// (Degradation.NoRetryInvalidations turns this off, and the entries then
// live until their TTL ends). The count is then of the keys deleted before
// the failure.
//
// With Options.Local, other processes' local tiers are told by a message
// on the bus once Redis applied the change. When only that message fails,
// the error matches ErrNotPublished: the delete landed, nothing is queued,
// and other local tiers may serve the old value for up to
// LocalOptions.TTL. InvalidatePrefix, InvalidateNamespace and Set report
// it the same way.
func (c *Cache[T]) Invalidate(ctx context.Context, keys ...string) (int64, error) {
	for _, k := range keys {
		if _, err := c.checkKey(k); err != nil {
			return 0, err
		}
	}
	if c.closed.Load() {
		return 0, ErrClosed
	}
	if len(keys) == 0 {
		return 0, nil
	}
	c.forget(keys)
	n, err := c.unlink(ctx, keys)
	if err != nil {
		for _, k := range keys {
			c.retryLater(retryKey, k)
		}
	}
	// Again after the UNLINK (and after a failure is queued): a load may
	// have started, and read the old entry, between the first Forget and now.
	c.forget(keys)
	c.counted(n)
	perr := c.invalidated(ctx, keys)
	if err != nil {
		// The retry publishes again once its UNLINK lands.
		return n, c.redisError(ctx, "invalidate", keysLabel(keys), err)
	}
	return n, perr
}

// unlink deletes keys through the guard, one UNLINK per key in one
// pipeline, under the write budget, and counts those that existed.
func (c *Cache[T]) unlink(ctx context.Context, keys []string) (int64, error) {
	if len(keys) == 1 {
		return c.guard.Unlink(ctx, keys[0]).Result() // the guard gives it the write budget too
	}
	var n int64
	cmds, err := c.guard.pipe(ctx, c.guard.writeBudget(len(keys)), writes, keys, func(p redis.Pipeliner, i int) redis.Cmder {
		return p.Unlink(ctx, keys[i])
	})
	for _, cmd := range cmds {
		ic, ok := cmd.(*redis.IntCmd)
		if !ok { // not sent
			err = cmp.Or(err, unsentErr(cmds, err))
			continue
		}
		if cerr := ic.Err(); cerr != nil {
			err = cmp.Or(err, cerr)
			continue
		}
		n += ic.Val()
	}
	return n, err
}

// unlinkOn deletes keys on one node, one UNLINK per key in a pipeline
// (Redis Cluster refuses multi-key commands across slots), and counts
// those that existed.
func unlinkOn(ctx context.Context, rdb interface {
	Unlink(ctx context.Context, keys ...string) *redis.IntCmd
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}, keys []string) (int64, error) {
	if len(keys) == 1 {
		return rdb.Unlink(ctx, keys[0]).Result()
	}
	cmds, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			p.Unlink(ctx, k)
		}
		return nil
	})
	var n int64
	for _, cmd := range cmds {
		if ic, ok := cmd.(*redis.IntCmd); ok && ic.Err() == nil {
			n += ic.Val()
		}
	}
	return n, err
}

func (c *Cache[T]) forget(keys []string) {
	for _, k := range keys {
		c.group.Forget(k)
	}
}

func (c *Cache[T]) counted(n int64) { c.ev.invalidated(n) }

func keysLabel(keys []string) string {
	if len(keys) == 1 {
		return keys[0]
	}
	return fmt.Sprintf("%s (+%d more)", keys[0], len(keys)-1)
}

// scanBatch is the COUNT hint of each SCAN and so the largest UNLINK
// pipeline InvalidatePrefix sends.
const scanBatch = 1000

// InvalidatePrefix deletes every key that starts with prefix, taken
// literally (glob characters in it are escaped), and returns how many it
// deleted. It SCANs with MATCH on every master of a Redis Cluster (every
// shard of a Ring) and UNLINKs each batch in one pipeline, checking ctx
// between batches. An empty prefix is refused with ErrInvalidKey.
//
// Contract: every key that existed when the call started and still exists
// when it returns has been deleted. A key created while it runs may
// survive. That is safe: a key created meanwhile holds either a lease whose
// load started after your write committed (so it reads the new data), or
// a value filled by such a load; a fill from a load that started earlier
// needs the lease it took before the SCAN reached its key, and deleting
// the key revoked that. On error (Redis, or ctx ending), the keys deleted so
// far are counted, the error is returned, and the prefix is queued for
// retry like a failed Invalidate: until the retry finishes the scan, this
// process's Gets of keys under prefix load from the source.
//
// SCAN visits the whole keyspace of each node, so the cost grows with the
// size of the database, not of the prefix. For groups that are large or
// invalidated often, use a Namespace.
func (c *Cache[T]) InvalidatePrefix(ctx context.Context, prefix string) (int64, error) {
	return c.invalidatePrefix(ctx, prefix, true)
}

// invalidatePrefix is InvalidatePrefix; retries made by the retry loop
// pass first=false, so a failure is neither queued again nor reported again.
func (c *Cache[T]) invalidatePrefix(ctx context.Context, prefix string, first bool) (int64, error) {
	if prefix == "" {
		return 0, fmt.Errorf("%w: empty prefix would invalidate everything", ErrInvalidKey)
	}
	if len(prefix) > c.opts.MaxKeySize {
		return 0, fmt.Errorf("%w: prefix of %d bytes exceeds MaxKeySize %d", ErrInvalidKey, len(prefix), c.opts.MaxKeySize)
	}
	if c.closed.Load() {
		return 0, ErrClosed
	}
	c.forgetPrefix(prefix)
	pattern := wire.EscapeGlob(prefix) + "*"
	var total atomic.Int64
	node := func(ctx context.Context, n scanner) error {
		var cursor uint64
		for {
			if err := ctx.Err(); err != nil {
				return err
			}
			keys, next, err := n.Scan(ctx, cursor, pattern, scanBatch).Result()
			if err != nil {
				return err
			}
			if len(keys) > 0 {
				d, err := unlinkOn(ctx, n, keys)
				total.Add(d)
				if err != nil {
					return err
				}
			}
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	}
	err := c.eachNode(ctx, node)
	if errors.Is(err, errShardedScan) {
		return 0, err
	}
	c.forgetPrefix(prefix) // again: loads that started during the scan
	n := total.Load()
	c.counted(n)
	if perr := c.invalidatedPrefix(ctx, prefix); perr != nil && err == nil {
		if !first {
			return n, nil // the retry's delete landed; the message failure was reported
		}
		return n, perr
	}
	if err != nil {
		if !first {
			return n, err
		}
		// Keys may remain whatever stopped the scan, the caller's deadline
		// included.
		c.retryLater(retryPrefix, prefix)
		if errors.Is(ctx.Err(), context.Canceled) {
			return n, ctx.Err()
		}
		return n, c.redisError(ctx, "invalidate-prefix", prefix, err)
	}
	return n, nil
}

// eachNode runs fn on every node that holds keys (every master of a
// Cluster, every shard of a Ring, concurrently), or on the one server: the
// walk of InvalidatePrefix and Audit. Per-node clients do not go through
// the breaker; ctx bounds them. A wrapper that shards without saying how
// (scanOne) gets errShardedScan once a CROSSSLOT reply has shown it.
func (c *Cache[T]) eachNode(ctx context.Context, fn func(context.Context, scanner) error) error {
	switch r := c.raw.(type) {
	case interface {
		ForEachMaster(context.Context, func(context.Context, *redis.Client) error) error
	}:
		return r.ForEachMaster(ctx, func(ctx context.Context, cl *redis.Client) error { return fn(ctx, cl) })
	case interface {
		ForEachShard(context.Context, func(context.Context, *redis.Client) error) error
	}:
		return r.ForEachShard(ctx, func(ctx context.Context, cl *redis.Client) error { return fn(ctx, cl) })
	}
	if c.splitReads.Load() && c.scanOne {
		return errShardedScan // one node's SCAN would miss the rest
	}
	return fn(ctx, c.guard)
}

// scanner is what InvalidatePrefix needs of one node.
type scanner interface {
	Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd
	Unlink(ctx context.Context, keys ...string) *redis.IntCmd
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// InvalidateNamespace drops every entry of ns with one command, whatever
// the namespace's size: it writes a new random generation (SET, with the
// same lifetime the cache gives generation keys), and every entry stamped
// with an older one reads as a miss from then on and is overwritten by the
// next load, or expires by its TTL. Loads in flight in the namespace are
// revoked too: their fills check the generation. The cache must have
// Options.Namespaced set. A Redis error is returned (and reported), and
// the bump is queued for retry like a failed Invalidate: until it lands,
// this process's Gets in the namespace load from the source.
//
// Generations are random rather than counted up with INCR so that a lost
// generation key (evicted, or expired for lack of reads) yields a new
// value rather than an old one, which would bring back entries from before
// a bump.
func (c *Cache[T]) InvalidateNamespace(ctx context.Context, ns Namespace) error {
	if !c.opts.Namespaced {
		return fmt.Errorf("%w: InvalidateNamespace on a cache without Options.Namespaced", ErrInvalidOptions)
	}
	if ns.tag == "" {
		return fmt.Errorf("%w: zero Namespace", ErrInvalidKey)
	}
	if c.closed.Load() {
		return ErrClosed
	}
	c.forgetPrefix(ns.Prefix())
	err := c.bumpGen(ctx, ns.genKey())
	if err != nil {
		c.retryLater(retryNS, ns.genKey())
	}
	c.forgetPrefix(ns.Prefix()) // again: loads that started before the SET landed
	perr := c.invalidatedNamespace(ctx, ns.genKey())
	if err != nil {
		return c.redisError(ctx, "invalidate-namespace", ns.genKey(), err)
	}
	return perr
}

// bumpGen gives the namespace whose generation key is genKey a new random
// generation (one SET, under the write budget).
func (c *Cache[T]) bumpGen(ctx context.Context, genKey string) error {
	g := newGen()
	if err := c.guard.Set(ctx, genKey, g[:], c.leases.genTTL).Err(); err != nil {
		return err
	}
	c.ev.bumped()
	return nil
}

// forgetPrefix makes later Gets of keys under prefix start new loads
// instead of joining loads already in flight in this process.
func (c *Cache[T]) forgetPrefix(prefix string) {
	c.inflight.Range(func(k, _ any) bool {
		if key := k.(string); strings.HasPrefix(key, prefix) {
			c.group.Forget(key)
		}
		return true
	})
}

// Set writes v under key (write-through), for a caller that already has the
// fresh value, typically right after committing it. It replaces whatever
// the key held, including a lease, so a load in flight cannot overwrite v
// with what it read before. Errors are returned (and reported): an encoding
// error or a value over MaxValueSize deletes the key instead, so no older
// value outlives the write; a Redis error queues the key's invalidation for
// retry, and until it lands this process's Gets of key load from the source
// (see Invalidate).
func (c *Cache[T]) Set(ctx context.Context, key string, v T) error {
	vk, err := c.checkKey(key)
	if err != nil {
		return err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	// In a tagged cache the entry carries its tags' generations, read (or
	// made) first: one more round trip.
	var gv genView
	var gerr error
	if len(vk.tags) > 0 {
		gvs, errs := c.tagGens(ctx, []verKeys{vk})
		gv, gerr = gvs[0], errs[0]
	}
	entry, ttl, err := c.encode(v, newToken(), gv.gen, 0, 0)
	if err != nil {
		c.ev.notCached(ctx)
		operr := c.report(ctx, "encode", key, err)
		if _, derr := c.Invalidate(ctx, key); derr != nil {
			return errors.Join(operr, derr)
		}
		return operr
	}
	// A Get that starts after Set returns must not join a load that began
	// before it: that load's value predates v.
	c.group.Forget(key)
	switch {
	case gerr != nil:
		err = gerr
	case vk.ns != "":
		// A write that must not be lost: the write budget (WriteTimeout).
		err = c.leases.runOne(ctx, c.leases.set(key, vk.ns, entry, ttl)).Err()
	default:
		err = c.guard.Set(ctx, key, entry, ttl).Err()
	}
	c.group.Forget(key) // again: a load that started before the SET landed
	if err != nil {
		// The old entry is still there: delete it as a failed
		// invalidation would be, and keep this process off it meanwhile.
		c.retryLater(retryKey, key)
		c.group.Forget(key)
		operr := c.redisError(ctx, "set", key, err)
		_ = c.invalidated(ctx, []string{key}) // the retry publishes again once it lands
		return operr
	}
	return c.invalidated(ctx, []string{key})
}
