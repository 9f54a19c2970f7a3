// Waiting for other holders: the backoff a Get or GetMany waits with while
// another caller (usually another process) holds the lease on its keys.

package cacheaside

import (
	"context"
	"time"
)

// waiter paces the lease rounds of one engine run whose keys other
// holders are loading: a jittered exponential backoff from PollMin to
// PollMax, for at most LoadTimeout + LeaseTTL in all (a live holder
// renews its lease while it loads, so a longer wait means a holder stuck
// without failing), after which the run loads from the source itself.
type waiter struct {
	ev      *events
	start   time.Time // zero until the first wait
	delay   time.Duration
	max     time.Duration
	deadAt  time.Duration // the whole wait's bound
	waiting bool
}

func (c *Cache[T]) newWaiter() *waiter {
	return &waiter{ev: c.ev, delay: c.opts.PollMin, max: c.opts.PollMax, deadAt: c.opts.LoadTimeout + c.opts.LeaseTTL}
}

// wait sleeps before the next lease round for keys held elsewhere. It
// returns errWaitedOut once the whole wait has reached its bound, or
// ctx's error when ctx ends first.
func (w *waiter) wait(ctx context.Context, keys int) error {
	if !w.waiting {
		w.waiting = true
		w.start = time.Now()
		w.ev.leaseContended(keys)
	} else if time.Since(w.start) > w.deadAt {
		return errWaitedOut
	}
	if err := sleep(ctx, jitter(w.delay)); err != nil {
		return err
	}
	w.delay = min(2*w.delay, w.max)
	return nil
}

// end records how long the run waited, if it did.
func (w *waiter) end() {
	if w.waiting {
		w.ev.waited(time.Since(w.start))
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
