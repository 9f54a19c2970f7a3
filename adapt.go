// Adaptive read budgets: the budget of a read follows the latency Redis
// actually shows, between Degradation.OpTimeout and MaxOpTimeout.

package cacheaside

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Adaptive budgets. A fixed budget is wrong in one direction or the other:
// set near a healthy Redis's latency, a Redis that slows down (a busy
// server, a saturated network, a host whose process is throttled) fails
// every read and sends the cache's whole load to the database; set far
// above it, a Redis that stops answering costs every Get that much before
// it falls back. So a read's budget (GET, MGET, lease rounds, PUBLISH) is
// 4 × the 99th percentile of recent successful reads (rounded up to a
// power of two microseconds), kept between
// OpTimeout (the floor) and MaxOpTimeout (the ceiling), in the spirit of
// Uber's CacheFront, which sets its Redis timeouts from observed latency.
//
// Only answers count. A Redis that answers slowly raises the percentile,
// and the budget with it, before its replies pass the budget; one that
// answers nothing (black-holed, or down) gives no samples, so the budget
// does not grow and the breaker opens as before. Reads that pass the
// budget while others succeed (more than 1% of a window) show the
// percentile lies beyond it: the budget doubles for the next window,
// within the ceiling. A timeout this process noticed late (errStarved) is
// its own lateness, not Redis's, and counts neither way.
//
// The percentile comes from a histogram of power-of-two buckets of
// microseconds over windows of adaptWindow reads; each window's buckets
// are halved at its end, so older windows fade rather than vanish.

// adaptWindow is how many reads (answered or timed out) one window holds.
const adaptWindow = 200

// adaptBuckets covers 1µs to 2^23µs (about 8s).
const adaptBuckets = 24

type adaptive struct {
	floor, ceil time.Duration
	cur         atomic.Int64 // the read budget now, in nanoseconds

	n        atomic.Int64 // reads in this window
	timeouts atomic.Int64 // reads of this window that passed their budget (the rest were answered)
	buckets  [adaptBuckets]atomic.Uint32
}

// newAdaptive starts at the floor. floor == ceil fixes the budget.
func newAdaptive(floor, ceil time.Duration) *adaptive {
	a := &adaptive{floor: floor, ceil: ceil}
	a.cur.Store(int64(floor))
	return a
}

// budget is the read budget now.
func (a *adaptive) budget() time.Duration { return time.Duration(a.cur.Load()) }

// answered records a read Redis answered in d.
func (a *adaptive) answered(d time.Duration) {
	if a.floor == a.ceil {
		return
	}
	us := uint64(max(d, 0) / time.Microsecond)
	a.buckets[min(bits.Len64(us), adaptBuckets-1)].Add(1)
	a.count()
}

// timedOut records a read that passed its budget.
func (a *adaptive) timedOut() {
	if a.floor == a.ceil {
		return
	}
	a.timeouts.Add(1)
	a.count()
}

// count ends the window at its adaptWindow-th read: the caller that
// counts it recomputes the budget.
func (a *adaptive) count() {
	if a.n.Add(1) == adaptWindow {
		a.recompute()
	}
}

// recompute sets the budget from the window's percentile and starts the
// next window. Reads that count meanwhile land in either window; the
// estimate does not need them exact.
func (a *adaptive) recompute() {
	timeouts := a.timeouts.Swap(0)
	a.n.Store(0)
	ok := adaptWindow - timeouts // the window's other reads were answered
	if ok <= 0 {
		return // nothing answered: Redis is down, not slow; the breaker's business
	}
	var total uint64
	var counts [adaptBuckets]uint64
	for i := range a.buckets {
		counts[i] = uint64(a.buckets[i].Load())
		total += counts[i]
	}
	cur := a.budget()
	next := cur
	if timeouts*100 > ok+timeouts {
		next = 2 * cur // over 1% passed the budget while others were answered
	} else {
		want := (total*99 + 99) / 100
		var seen uint64
		for i, c := range counts {
			seen += c
			if seen >= want {
				next = 4 * time.Duration(uint64(1)<<i) * time.Microsecond // the bucket's upper edge, 4 times
				break
			}
		}
	}
	a.cur.Store(int64(min(max(next, a.floor), a.ceil)))
	for i := range a.buckets {
		a.buckets[i].Store(uint32(counts[i] / 2))
	}
}
