// Shared reads: the Gets of a stampede park on one Get's queued read
// instead of each waking to decode it and join the load.

package cacheaside

import (
	"context"
	"errors"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// Shared reads. In a stampede, a thousand Gets of one cold key queue their
// reads for one MGET (coalesce.go). Were each woken by the answer, a
// thousand goroutines would be runnable at once just when the flight's
// leader needs the CPU: the runtime reads the network only when it has
// nothing else to run, so the reply to the leader's read or lease script
// would wait behind them, and its loader would start milliseconds late.
//
// So a Get whose key another Get has queued for an MGET not yet sent
// shares that read: it gets the bytes its own read in the same MGET would
// have got, so what it may serve does not change (the read is sent after
// it began). The Get that queued the read (the first) decides for the
// others when to go on: after a hit or a failure at once, each to settle
// the bytes itself; after a miss it hands them the flight it joined, and
// lets them go once that flight has answered, so they wake once, with
// their answer. A Get that shares counts, settles and joins as if it had
// read alone; only its wake-up moves.

// sharedRead is a Get's queued read that other Gets of the key share.
type sharedRead struct {
	ready  chan struct{} // closed by the first Get (release)
	others int           // Gets that share it (under coalescer.mu)

	// set by the first Get before it closes ready
	b     []byte
	gv    genView
	err   error
	spent time.Duration
	read  bool // b, gv, err and spent are its read; false if it gave up first
	call  any  // the flight (*flight.Call[answer[T]]) it joined on a miss, or nil
	gone  bool // released (touched by the first Get only)
}

// share queues a read of keys for the next MGET, unless a Get's read of
// the same key is queued already and not yet sent: it returns the queued
// read and whether this caller queued it.
func (q *coalescer) share(key string, vk verKeys) (r *readReq, first bool) {
	q.mu.Lock()
	if r := q.heads[key]; r != nil {
		if r.shared == nil {
			r.shared = &sharedRead{ready: make(chan struct{})}
		}
		r.shared.others++
		q.mu.Unlock()
		return r, false
	}
	r = &readReq{keys: vk.with(key), done: make(chan struct{}), head: true}
	if q.heads == nil {
		q.heads = make(map[string]*readReq)
	}
	q.heads[key] = r
	q.queue = append(q.queue, r)
	q.mu.Unlock()
	q.kick()
	return r, true
}

// unshare ends the sharing of the reads of batch, which are about to be
// sent. The caller holds q.mu.
func (q *coalescer) unshare(batch []*readReq) {
	for _, r := range batch {
		if r.head && q.heads[r.keys[0]] == r {
			delete(q.heads, r.keys[0])
		}
	}
}

// sharers returns what the Gets that shared the queued read r need (nil:
// none did), once no more can, and whether r was answered: at once if it
// was (its batch was taken before), else after r is taken out of heads.
func (q *coalescer) sharers(r *readReq) (sh *sharedRead, answered bool) {
	if closed(r.done) {
		return r.shared, true
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.heads[r.keys[0]] == r {
		delete(q.heads, r.keys[0])
	}
	return r.shared, closed(r.done)
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// release lets the Gets that share sh go on, handing them call (nil:
// each settles the read itself). Only the first Get calls it; after the
// first call it does nothing.
func (sh *sharedRead) release(call any) {
	if sh.gone {
		return
	}
	sh.gone = true
	sh.call = call
	close(sh.ready)
}

// readGet is a Get's read of op's key into op.b, op.gv and op.rerr
// (Cache.read, or a share of another Get's queued read), and how long it
// took. The first Get of a shared read finds it in op.shared and must
// release it; a Get that shared one gets it back, with the flight to join
// if the first Get handed one.
func (c *Cache[T]) readGet(ctx context.Context, op *keyOp[T]) (spent time.Duration, shared *sharedRead) {
	t0 := time.Now()
	q := c.reads
	if q == nil || op.attempt > 0 {
		op.b, op.gv, op.rerr = c.read(ctx, op.key, op.vk)
		return time.Since(t0), nil
	}
	if q.begin() {
		op.b, op.gv, op.rerr = c.readDirect(ctx, op.key, op.vk)
		q.end()
		return time.Since(t0), nil
	}
	r, first := q.share(op.key, op.vk)
	if first {
		op.b, op.gv, op.rerr = coalescedRead(op.vk)(q.await(ctx, c.guard.readBudget(), r))
		spent = time.Since(t0)
		if sh, answered := q.sharers(r); sh != nil {
			// The others get the read's answer, not this Get's: its own
			// deadline or cancellation may have ended its wait first.
			if answered {
				sh.b, sh.gv, sh.err = coalescedRead(op.vk)(r.vals, r.err)
				sh.read = true
			}
			sh.spent = spent
			op.shared = sh
		}
		return spent, nil
	}
	sh := r.shared // set by share, under the lock
	// With a deadline, bounded as its own queued read would be (half what
	// remains): the first Get's bound may be longer. Without one the bound
	// is the first Get's own (twice the budget), whose timer started
	// first: it lets this Get go, unanswered, when it fires. Past the read,
	// the first Get's decision waits for its flight's first lease round, as
	// this Get, after a miss of its own, would wait for that flight.
	var err error
	if _, ok := ctx.Deadline(); ok {
		err = queuedWait(ctx, c.guard.readBudget(), sh.ready)
	} else if !wait(ctx, sh.ready) {
		err = ctx.Err()
	}
	switch {
	case err == nil:
	case errors.Is(err, errStarved) && closed(r.done): // answered; the first Get has not decided yet
		op.b, op.gv, op.rerr = coalescedRead(op.vk)(r.vals, r.err)
		return time.Since(t0), nil
	default:
		op.rerr = err
		return time.Since(t0), nil
	}
	if !sh.read { // the first Get gave up before the answer: wait for it here
		op.b, op.gv, op.rerr = coalescedRead(op.vk)(q.await(ctx, c.guard.readBudget(), r))
		return time.Since(t0), nil
	}
	op.b, op.gv, op.rerr = sh.b, sh.gv, sh.err
	return sh.spent, sh
}

// handOn hands op's flight to the Gets that shared op's read, once the
// flight's first lease round has answered (or it ended, or op's caller
// gave up): they wake while the loader runs, join the flight and park on
// it, and do not compete for the CPU with the leader's lease round.
func (c *Cache[T]) handOn(ctx context.Context, op *keyOp[T]) {
	fs := op.fs
	if !op.leader {
		fs = c.seenFlight(op.key).f // the flight op joined, or (rarely) a later one: it only times the wake-up
	}
	var begun <-chan struct{}
	if fs != nil {
		begun = fs.begun
	}
	select {
	case <-begun:
	case <-op.call.Done():
	case <-ctx.Done():
	}
	op.shared.release(op.call)
}

// wait waits for ch to close, or ctx to end first (false). A stampede's
// Gets all wait for their flight, often with a ctx that never ends: they
// then spare the select.
func wait(ctx context.Context, ch <-chan struct{}) bool {
	done := ctx.Done()
	if done == nil {
		<-ch
		return true
	}
	select {
	case <-ch:
		return true
	case <-done:
		return false
	}
}

// handed is the flight the first Get of sh handed on (nil: none).
func handed[T any](sh *sharedRead) *flight.Call[answer[T]] {
	if sh == nil {
		return nil
	}
	call, _ := sh.call.(*flight.Call[answer[T]])
	return call
}
