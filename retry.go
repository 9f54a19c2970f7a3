// Failed invalidations: the retry queue, and the pending set that keeps this
// process's Gets of a key whose invalidation failed off the cache until the
// retry lands, so a writer always reads its own write.

package cacheaside

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
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

// retryQueue holds the failed invalidations waiting to be retried, by id
// (a retry kind, then what it invalidates), and whether the goroutine
// retrying them runs.
type retryQueue struct {
	mu       sync.Mutex
	ops      map[string]retryOp
	prefixes int          // prefixes among ops
	running  bool         // the retry goroutine runs
	pending  atomic.Int64 // len(ops): Gets look at the queue only when it is not 0
}

func newRetryQueue() *retryQueue { return &retryQueue{ops: make(map[string]retryOp)} }

// add queues id, or records a newer failure of it. It reports whether id
// is new (false also when the queue is full: then full is true) and
// whether the caller should start the retry goroutine (start may refuse:
// the cache is closed).
func (q *retryQueue) add(id string, start func() bool) (isNew, full, run bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	old, ok := q.ops[id]
	if !ok && len(q.ops) >= maxRetries {
		return false, true, false
	}
	q.ops[id] = retryOp{since: time.Now(), seq: old.seq + 1}
	if !ok {
		if id[0] == retryPrefix {
			q.prefixes++
		}
		q.pending.Add(1)
	}
	run = !q.running && start()
	if run {
		q.running = true
	}
	return !ok, false, run
}

// retire removes id unless a newer failure replaced it, and reports
// whether it did.
func (q *retryQueue) retire(id string, seq uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if cur, ok := q.ops[id]; ok && cur.seq == seq {
		delete(q.ops, id)
		if id[0] == retryPrefix {
			q.prefixes--
		}
		q.pending.Add(-1)
		return true
	}
	return false
}

// covers reports whether a queued invalidation covers key (whose version
// keys, a namespace's generation key or its tags', are vk). The hit path
// pays one atomic load for it while nothing is queued.
func (q *retryQueue) covers(key string, vk verKeys) bool {
	if q.pending.Load() == 0 {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, ok := q.ops[string(retryKey)+key]; ok {
		return true
	}
	for _, k := range vk.keys() {
		if _, ok := q.ops[string(retryNS)+k]; ok {
			return true
		}
	}
	if q.prefixes > 0 {
		for id := range q.ops {
			if id[0] == retryPrefix && strings.HasPrefix(key, id[1:]) {
				return true
			}
		}
	}
	return false
}

// snapshot copies the queue, for one pass of the retry goroutine.
func (q *retryQueue) snapshot() map[string]retryOp {
	q.mu.Lock()
	defer q.mu.Unlock()
	ops := make(map[string]retryOp, len(q.ops))
	for id, op := range q.ops {
		ops[id] = op
	}
	return ops
}

// done reports whether the queue is empty, and if so marks the retry
// goroutine stopped.
func (q *retryQueue) done() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.ops) > 0 {
		return false
	}
	q.running = false
	return true
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
	isNew, full, run := c.retries.add(string(kind)+what, c.enter)
	switch {
	case full:
		c.ev.dropped()
	case isNew:
		c.ev.queued()
	}
	if run {
		go c.retryLoop()
	}
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
		if c.retryPass(c.retries.snapshot()) {
			pause = 50 * time.Millisecond
		} else {
			pause = min(2*pause, maxRetryPause)
		}
		if c.retries.done() {
			return
		}
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
			if c.retries.retire(id, op.seq) {
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
			if c.retries.retire(id, ops[id].seq) {
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
		if c.retries.retire(id, op.seq) {
			c.ev.retried()
		}
	}
	return true
}
