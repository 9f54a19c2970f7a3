// Failed invalidations: the retry queue, and the pending set that keeps this
// process's Gets of a key whose invalidation failed off the cache until the
// retry lands, so a writer always reads its own write.

package cacheaside

import (
	"context"
	"strings"
	"time"
)

// A write whose invalidation failed (Invalidate, InvalidatePrefix,
// InvalidateNamespace, or a Set that could not write) leaves an entry in
// Redis that is older than the source of truth. Unless
// Degradation.NoRetryInvalidations is set, the invalidation is queued:
//
//   - a goroutine retries it, within 50-200 ms pauses, until it lands or
//     the longest lifetime the cache writes has passed (by then the entry
//     has expired anyway);
//   - until then the key (prefix, namespace) is pending: this process's
//     Gets of it skip the local tier and Redis and call the loader, as they
//     do while Redis is down (within MaxLoadsWhileDown), so the process
//     that wrote never reads the older value back. Other processes serve
//     the Redis entry until the retry deletes it.
//
// The breaker does not turn an invalidation into a no-op: a command it
// skips fails like any other, and is queued.

// retry kinds, the first byte of a retry id.
const (
	retryKey    = 'k' // what: the key
	retryPrefix = 'p' // what: the prefix
	retryNS     = 'n' // what: the namespace's generation key
)

// retryOp is one failed invalidation waiting to be retried.
type retryOp struct {
	since time.Time // latest failure
	seq   uint64    // bumped by each failure, so a retry in flight cannot retire a newer one
}

// maxRetryPause is the longest pause between two passes of the retry
// queue: a queued invalidation lands at most this long after Redis takes
// writes again (plus the write's own time).
const maxRetryPause = 200 * time.Millisecond

// maxRetries bounds the invalidations kept for retry.
const maxRetries = 10000

// retryBound is how long a failed invalidation is retried: the longest
// lifetime the cache gives an entry, unless RetryInvalidations says
// otherwise.
func (c *Cache[T]) retryBound() time.Duration {
	if d := c.opts.Degradation.RetryInvalidations; d > 0 {
		return d
	}
	p := c.opts.Policy
	return max(p.TTL+p.staleWindow(), p.NegativeTTL) + c.opts.LeaseTTL
}

// retryLater queues the invalidation of what (a key, prefix or namespace
// generation key, by kind) and makes sure the retry goroutine runs. While
// it is queued, this process's Gets it covers bypass the cache.
func (c *Cache[T]) retryLater(kind byte, what string) {
	if c.opts.Degradation.NoRetryInvalidations {
		return
	}
	id := string(kind) + what
	c.retryMu.Lock()
	old, ok := c.retries[id]
	if !ok && len(c.retries) >= maxRetries {
		c.retryMu.Unlock()
		c.ev.dropped()
		return
	}
	c.retries[id] = retryOp{since: time.Now(), seq: old.seq + 1}
	if !ok {
		if kind == retryPrefix {
			c.pendingPrefixes++
		}
		c.pending.Add(1)
	}
	start := !c.retrying && c.enter()
	if start {
		c.retrying = true
	}
	c.retryMu.Unlock()
	if !ok {
		c.ev.queued()
	}
	if start {
		go c.retryLoop()
	}
}

// retired removes id from the queue unless a newer failure replaced it,
// and reports whether it did. A retry that landed is counted only then, so
// each queued invalidation is counted retried at most once (a newer failure
// of the same keys joins the queued entry rather than being counted again).
func (c *Cache[T]) retired(id string, seq uint64) bool {
	c.retryMu.Lock()
	defer c.retryMu.Unlock()
	if cur, ok := c.retries[id]; ok && cur.seq == seq {
		delete(c.retries, id)
		if id[0] == retryPrefix {
			c.pendingPrefixes--
		}
		c.pending.Add(-1)
		return true
	}
	return false
}

// pendingFor reports whether an invalidation covering key (in the
// namespace whose generation key is genKey) waits for its retry. The hit
// path pays one atomic load for it while nothing is pending.
func (c *Cache[T]) pendingFor(key, genKey string) bool {
	if c.pending.Load() == 0 {
		return false
	}
	c.retryMu.Lock()
	defer c.retryMu.Unlock()
	if _, ok := c.retries[string(retryKey)+key]; ok {
		return true
	}
	if genKey != "" {
		if _, ok := c.retries[string(retryNS)+genKey]; ok {
			return true
		}
	}
	if c.pendingPrefixes > 0 {
		for id := range c.retries {
			if id[0] == retryPrefix && strings.HasPrefix(key, id[1:]) {
				return true
			}
		}
	}
	return false
}

// retryLoop retries queued invalidations, keys in batches and prefixes and
// namespaces one by one, pausing 50 ms, then up to 200 ms, between passes,
// until each lands or outlives retryBound. A pass stops at its first
// failure: Redis is still failing, and the rest waits for the next pass.
// Retries go past an open breaker (pastBreaker): they are the background's
// work, and land as soon as Redis takes writes again. It ends when the
// queue is empty or the cache closes.
func (c *Cache[T]) retryLoop() {
	defer c.wg.Done()
	pause := 50 * time.Millisecond
	for {
		select {
		case <-c.stop.Done():
			return
		case <-time.After(pause):
		}
		c.retryMu.Lock()
		ops := make(map[string]retryOp, len(c.retries))
		for id, op := range c.retries {
			ops[id] = op
		}
		c.retryMu.Unlock()
		if c.retryPass(ops) {
			pause = 50 * time.Millisecond
		} else {
			pause = min(2*pause, maxRetryPause)
		}
		c.retryMu.Lock()
		if len(c.retries) == 0 {
			c.retrying = false
			c.retryMu.Unlock()
			return
		}
		c.retryMu.Unlock()
	}
}

// retryPass makes one pass over ops and reports whether all of them
// landed (or were given up).
func (c *Cache[T]) retryPass(ops map[string]retryOp) bool {
	bound := c.retryBound()
	var keys []string
	var keyIDs []string
	for id, op := range ops {
		if time.Since(op.since) > bound {
			if c.retired(id, op.seq) {
				c.ev.dropped()
			}
			delete(ops, id)
			continue
		}
		if id[0] == retryKey {
			keys, keyIDs = append(keys, id[1:]), append(keyIDs, id)
		}
	}
	for i := 0; i < len(keys); i += scanBatch {
		if c.stop.Err() != nil {
			return false
		}
		j := min(i+scanBatch, len(keys))
		ctx, cancel := context.WithTimeout(pastBreaker(c.stop), c.guard.writeBudget(j-i))
		n, err := c.unlink(ctx, keys[i:j])
		c.counted(n)
		if err != nil {
			c.ev.redisError(c.stop, "invalidate", err) // counted, not logged: the first failure was
		}
		if err == nil {
			// The delete landed: a message that fails is reported, not
			// retried (other local tiers expire by LocalOptions.TTL).
			_ = c.invalidated(ctx, keys[i:j])
		}
		cancel()
		if err != nil {
			return false
		}
		for _, id := range keyIDs[i:j] {
			if c.retired(id, ops[id].seq) {
				c.ev.retried()
			}
		}
	}
	for id, op := range ops {
		if id[0] == retryKey {
			continue
		}
		if c.stop.Err() != nil {
			return false
		}
		ctx, cancel := context.WithTimeout(pastBreaker(c.stop), c.guard.bulkBudget())
		var err error
		switch id[0] {
		case retryPrefix:
			_, err = c.invalidatePrefix(ctx, id[1:], false)
		case retryNS:
			if err = c.bumpGen(ctx, id[1:]); err == nil {
				_ = c.invalidatedNamespace(ctx, id[1:])
			}
		}
		cancel()
		if err != nil {
			return false
		}
		if c.retired(id, op.seq) {
			c.ev.retried()
		}
	}
	return true
}
