// Command budgets: on the hit path, a context whose deadline and Done both
// end at the budget without a timer of its own; on the miss path, the
// account of the Redis time a whole Get may spend.

package cacheaside

import (
	"context"
	"sync/atomic"
	"time"
)

// budgetCtx is the context of a read on the hit path while Redis is
// healthy. Its deadline is the budget: with ContextTimeoutEnabled, go-redis
// turns it into the socket deadline of the read and write. Its Done closes
// at the budget too (within a millisecond), so what waits on Done rather
// than on the socket is cut there as well: go-redis's backoff between
// retries, a dial's retries and their backoff, a wait for a free pooled
// connection. That is what keeps a client with go-redis's default retry
// settings (MaxRetries 3, DialerRetries 5) within the budget when Redis
// dies between two commands.
//
// It costs one allocation, where context.WithTimeout costs four or more:
// Done is a channel shared by every budget that ends in the same
// millisecond (budgetWheel), closed by one timer. The price is that the
// caller's cancellation does not reach a command already sent: it ends at
// its budget instead (OpTimeout, 50ms by default), and the Get then
// returns the caller's error. Values come from the caller's context.
type budgetCtx struct {
	context.Context // the caller's: Value
	at              time.Time
	done            <-chan struct{}
}

func newBudgetCtx(parent context.Context, at time.Time) *budgetCtx {
	return &budgetCtx{Context: parent, at: at, done: budgets.done(at)}
}

func (b *budgetCtx) Deadline() (time.Time, bool) { return b.at, true }
func (b *budgetCtx) Done() <-chan struct{}       { return b.done }

func (b *budgetCtx) Err() error {
	select {
	case <-b.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

// budgetWheel hands out Done channels for deadlines: one per millisecond,
// created by the first budget that ends in it and closed by one timer at
// its end. Slots are reused as time moves on; a deadline further ahead
// than the wheel turns gets a channel of its own.
type budgetWheel struct {
	slots [wheelSlots]atomic.Pointer[wheelSlot]
}

const wheelSlots = 4096 // milliseconds: budgets up to about 4s share channels

type wheelSlot struct {
	ms int64 // the millisecond (Unix) at whose end ch closes
	ch chan struct{}
}

var budgets budgetWheel

// done returns a channel that is closed once at has passed, at most about
// a millisecond later.
func (w *budgetWheel) done(at time.Time) <-chan struct{} {
	ms := at.UnixMilli() + 1 // the end of at's millisecond
	if time.Until(time.UnixMilli(ms)) >= wheelSlots*time.Millisecond {
		return closeAt(ms)
	}
	slot := &w.slots[ms%wheelSlots]
	for {
		s := slot.Load()
		if s != nil && s.ms == ms {
			return s.ch
		}
		if s != nil && s.ms > ms { // taken by a later turn: not expected, but stay correct
			return closeAt(ms)
		}
		n := &wheelSlot{ms: ms, ch: make(chan struct{})}
		if slot.CompareAndSwap(s, n) {
			time.AfterFunc(time.Until(time.UnixMilli(ms)), func() { close(n.ch) })
			return n.ch
		}
	}
}

// closeAt returns a channel of its own that closes at ms.
func closeAt(ms int64) <-chan struct{} {
	ch := make(chan struct{})
	time.AfterFunc(time.Until(time.UnixMilli(ms)), func() { close(ch) })
	return ch
}

// redisTime is what one Get or GetMany may still spend on Redis
// (Degradation.RedisTimePerGet), in nanoseconds. The engine's context
// carries it; every command it sends is charged (see guarded.begin).
type redisTime struct{ left atomic.Int64 }

type redisTimeKey struct{}

// withRedisTime returns ctx carrying an account of left Redis time.
func withRedisTime(ctx context.Context, left time.Duration) context.Context {
	t := &redisTime{}
	t.left.Store(int64(left))
	return context.WithValue(ctx, redisTimeKey{}, t)
}

// withoutRedisTime returns ctx with no account of Redis time.
func withoutRedisTime(ctx context.Context) context.Context {
	return context.WithValue(ctx, redisTimeKey{}, (*redisTime)(nil))
}
