// Read coalescing: concurrent Gets' reads sent as one MGET.

package cacheaside

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// Read coalescing. Under concurrency, a Cache sends the reads of many Gets
// as one MGET: a Get whose read finds directReads reads already on the
// wire queues its keys, and one goroutine sends everything queued in one
// MGET (the same key once), then hands each Get its bytes to decode on its
// own goroutine. One round trip and one command replace dozens, for the
// client and for Redis, and a lone Get still sends its own GET at once.
// Up to maxSends MGETs are on the wire at once, and the queue is taken
// only when a slot is free, so a read waits in the queue, where a Get of
// the same key can still share it (shared.go), not in a batch taken
// already; each queued Get waits at most twice its operation budget (a
// free slot, then the MGET). On a client
// that shards (Cluster, Ring), the queued reads go out as one pipeline of
// GETs instead, which go-redis sends as one round trip per node.

// directReads is how many reads may be on the wire, each alone, before
// further reads are coalesced.
const directReads = 2

// maxSends is how many coalesced MGETs may be on the wire at once, so a
// slow reply does not hold every queued read behind it.
const maxSends = 4

// maxCoalesced is the most distinct keys one coalesced MGET carries (a
// stampede's thousand reads of one key are one MGET of one key).
const maxCoalesced = 256

type coalescer struct {
	direct atomic.Int32 // reads on the wire alone

	mu    sync.Mutex
	queue []*readReq          // reads waiting for the next MGET
	heads map[string]*readReq // of those, the Gets' reads others may share, by key (shared.go)
	wake  chan struct{}
	sends chan struct{} // maxSends slots for MGETs on the wire
	wg    sync.WaitGroup
}

// readReq is one Get's read waiting in the queue.
type readReq struct {
	keys []string // the entry, and its version keys (verKeys.with)
	vals [][]byte // the bytes under keys (nil: absent)
	err  error
	done chan struct{}

	head   bool        // a Get's read, in coalescer.heads while queued (shared.go)
	shared *sharedRead // what the Gets that shared it need; nil until one does
}

func newCoalescer() *coalescer {
	return &coalescer{wake: make(chan struct{}, 1), sends: make(chan struct{}, maxSends)}
}

// begin reports whether a read may go on the wire alone; if so, the
// caller must call end after it.
func (q *coalescer) begin() bool {
	if q.direct.Add(1) <= directReads {
		return true
	}
	q.direct.Add(-1)
	return false
}

func (q *coalescer) end() { q.direct.Add(-1) }

// wait queues keys for the next MGET and waits for its answer: at most
// twice budget (a free slot to send, then the MGET's own budget), and
// never more than half of what remains of ctx's deadline.
func (q *coalescer) wait(ctx context.Context, budget time.Duration, keys ...string) ([][]byte, error) {
	r := &readReq{keys: keys, done: make(chan struct{})}
	q.mu.Lock()
	q.queue = append(q.queue, r)
	q.mu.Unlock()
	q.kick()
	return q.await(ctx, budget, r)
}

// kick wakes the sender for what was just queued.
func (q *coalescer) kick() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// await waits for queued r's answer, bounded as wait says.
func (q *coalescer) await(ctx context.Context, budget time.Duration, r *readReq) ([][]byte, error) {
	if err := queuedWait(ctx, budget, r.done); err != nil {
		return nil, err
	}
	return r.vals, r.err
}

// queuedWait waits for ch to close (nil), at most as long as a queued read
// may wait (see wait), or for ctx to end (its error).
func queuedWait(ctx context.Context, budget time.Duration, ch <-chan struct{}) error {
	wait := 2 * budget
	if dl, ok := ctx.Deadline(); ok {
		wait = max(min(wait, time.Until(dl)/2), time.Millisecond)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
		// Queued behind this process's own reads, or the read it joined
		// is still out: the MGET reports Redis's part itself. This is the
		// process's lateness (errStarved), and the Get goes on with Redis.
		return fmt.Errorf("%w: %w: %w", errStarved, context.DeadlineExceeded, errReadQueued)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// readFn reads keys in one round trip (Cache.readKeys: one MGET, or a
// pipeline of GETs on a client that shards).
type readFn func(ctx context.Context, keys []string) ([][]byte, []error)

// run sends what is queued, up to maxSends reads at a time, until stop
// ends.
func (q *coalescer) run(stop context.Context, read readFn) {
	defer q.wg.Wait()
	for {
		select {
		case <-stop.Done():
			q.fail(ErrClosed)
			return
		case <-q.wake:
		}
		for {
			// A free slot first: while every slot is busy, reads wait in
			// the queue, where later Gets of their keys can share them
			// (shared.go), rather than in a batch already taken.
			select {
			case q.sends <- struct{}{}:
			case <-stop.Done():
				q.fail(ErrClosed)
				return
			}
			q.mu.Lock()
			batch := q.queue
			distinct := make(map[string]struct{}, min(len(batch), maxCoalesced))
			for i, r := range batch {
				fresh := 0
				for _, k := range r.keys {
					if _, ok := distinct[k]; !ok {
						fresh++
					}
				}
				if len(distinct)+fresh > maxCoalesced && i > 0 {
					batch = batch[:i]
					break
				}
				for _, k := range r.keys {
					distinct[k] = struct{}{}
				}
			}
			q.queue = q.queue[len(batch):]
			if len(q.queue) == 0 {
				q.queue = nil
			}
			q.unshare(batch)
			q.mu.Unlock()
			if len(batch) == 0 {
				<-q.sends
				break
			}
			q.wg.Go(func() {
				defer func() { <-q.sends }()
				q.send(stop, read, batch)
			})
		}
	}
}

// send answers batch with one read of its distinct keys. A panic on the
// way (a Recorder called by the breaker, say) fails the batch instead of
// the process.
func (q *coalescer) send(stop context.Context, read readFn, batch []*readReq) {
	answered := false
	defer func() {
		if r := recover(); r != nil && !answered {
			for _, req := range batch {
				req.err = panicIn("a coalesced read", r, debug.Stack())
				close(req.done)
			}
		}
	}()
	index := make(map[string]int, len(batch))
	keys := make([]string, 0, len(batch))
	for _, r := range batch {
		for _, k := range r.keys {
			if _, ok := index[k]; !ok {
				index[k] = len(keys)
				keys = append(keys, k)
			}
		}
	}
	vals, errs := read(stop, keys)
	answered = true
	for _, r := range batch {
		r.vals = make([][]byte, len(r.keys))
		for i, k := range r.keys {
			j := index[k]
			r.vals[i] = vals[j]
			if r.err == nil && errs[j] != nil {
				r.err = errs[j]
			}
		}
		close(r.done)
	}
}

// fail answers everything queued with err.
func (q *coalescer) fail(err error) {
	q.mu.Lock()
	batch := q.queue
	q.queue = nil
	q.unshare(batch)
	q.mu.Unlock()
	for _, r := range batch {
		r.err = err
		close(r.done)
	}
}

// readCoalesced is Cache.read through the coalescer: the bytes under key
// and the generation its version keys give.
func (c *Cache[T]) readCoalesced(ctx context.Context, key string, vk verKeys) (b []byte, gv genView, err error) {
	if !vk.versioned() {
		return coalescedRead(vk)(c.reads.wait(ctx, c.guard.readBudget(), key))
	}
	return coalescedRead(vk)(c.reads.wait(ctx, c.guard.readBudget(), vk.with(key)...))
}

// coalescedRead returns the function that turns a coalesced read's
// answer (the bytes of the entry, then of its version keys) into what
// Cache.read returns.
func coalescedRead(vk verKeys) func(vals [][]byte, err error) ([]byte, genView, error) {
	return func(vals [][]byte, err error) ([]byte, genView, error) {
		gv := genView{versioned: vk.versioned()}
		switch {
		case err != nil:
			return nil, gv, err
		case !gv.versioned:
			return vals[0], gv, nil
		}
		return vals[0], vk.view(vals[1:]), nil
	}
}
