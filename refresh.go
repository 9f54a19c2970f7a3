// Freshness: soft expiry, stale windows, XFetch early refresh and
// background refreshes.

package cacheaside

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Freshness. Every value entry records its soft expiry (fill time plus the
// jittered TTL, by this process's clock) and how long its load took. Redis
// keeps the entry for the TTL plus the policy's stale window, so past the
// soft expiry the old value is still there to serve:
//
//	fill ───────── TTL ──────────┬──── stale-while-revalidate ────┬── stale-if-error ──┬ gone
//	   fresh: served; XFetch may │ stale: served while one        │ reloaded now; the  │
//	   start an early refresh    │ background refresh runs       │ old value is served│
//	                             │                               │ if the reload fails│
//
// Refreshes run under the same lease as loads (refresh.lua turns the value
// into a "refreshing" entry that readers still serve), so across processes
// one caller reloads and everyone else keeps reading. Clocks only decide
// freshness; the lease token, not the time, decides which fill may write.

// refreshEarly is XFetch (Vattani, Chierichetti, Lowenstein, "Optimal
// Probabilistic Cache Stampede Prevention", VLDB 2015): refresh a fresh
// value before it expires with probability rising as expiry nears, scaled
// by how long its load took, so a hot key is reloaded once, just in time,
// and never expires under load.
func (c *Cache[T]) refreshEarly(e *envelope.Entry, now time.Time) bool {
	beta := c.opts.Policy.Beta
	if beta == 0 || e.SoftExpiry == 0 {
		return false
	}
	gap := float64(e.SoftExpiry - now.UnixMilli())
	delta := float64(max(e.LoadMillis, 1)) * beta
	if gap > 40*delta { // probability below e^-40: skip the logarithm
		return false
	}
	return -delta*math.Log(rand.Float64()) >= gap
}

// keepOnFailure is how long a value being refreshed may still be served
// if its refresh fails: up to the end of its stale window.
func (c *Cache[T]) keepOnFailure(e *envelope.Entry) time.Duration {
	if e.SoftExpiry == 0 {
		return 0
	}
	end := time.UnixMilli(e.SoftExpiry).Add(c.opts.Policy.staleWindow())
	return end.Sub(c.opts.Clock())
}

// refreshAsync reloads the value op read, in the background, unless this
// process is already refreshing the key or its last refresh failed less
// than the gate's retry time ago (refreshGate). The goroutine belongs to the cache: Close cancels
// and waits for it.
func (c *Cache[T]) refreshAsync(parent context.Context, op *keyOp[T], src source[T]) {
	if !c.refreshes.start(op.key) {
		return
	}
	if !c.enter() {
		c.refreshes.end(op.key, false)
		return
	}
	rop := &keyOp[T]{key: op.key, vk: op.vk, idx: op.idx, vw: view[T]{state: stReload, v: op.vw.v, e: op.vw.e}, fs: new(flightState)}
	r := &missRun[T]{c: c, src: src, ops: []*keyOp[T]{rop}}
	go r.refresh(parent)
}

// refresh is a background refresh: a one-key run of the engine that enters
// at the lease round, where refresh.lua takes the lease in place (readers
// go on serving the old value), and never waits: if another holder has the
// key, or its value changed, the refresh ends. The rest is the engine's:
// the loader call, the fill or the release that puts the value back (with
// retries and a wake message), and settleAll, which releases the lease and
// ends the run after a panic in a codec, hook or Recorder. A refresh that
// took the lease, or panicked, is counted in Stats.Refreshes (and
// RefreshErrors when it failed); a panic is also reported, as nobody waits
// for its outcome.
func (r *missRun[T]) refresh(parent context.Context) {
	c, op := r.c, r.ops[0]
	defer c.wg.Done()
	cancel, stop := r.detach(context.WithValue(parent, backgroundKey{}, true))
	defer cancel()
	defer stop()
	kind := op.vw.e.Kind
	var took, gone bool
	defer func() {
		switch {
		case r.panicked != nil:
			c.report(r.ctx, "refresh", op.key, r.panicked)
		case gone:
			// Another holder alive by Redis's clock, or a new value: leave
			// the key alone for the gate's retry time after a holder, however the
			// clocks disagree.
			c.refreshes.end(op.key, kind == envelope.Refreshing)
			return
		case !took: // Redis failed (reported by the lease round)
			c.refreshes.end(op.key, true)
			return
		}
		failed := op.err != nil && !errors.Is(op.err, ErrNotFound)
		c.ev.refreshed(op.err, failed)
		c.refreshes.end(op.key, failed)
	}()
	defer r.settleAll()
	op.tok, op.proof = newLease()
	for {
		late := op.late
		held, open, _ := r.leaseRound(r.ops)
		switch {
		case len(held) > 0:
			took = true
			r.loadAndFill(held)
		case len(open) > 0 && op.late > late:
			continue // the reply was read late: the same round again (see leaseRound)
		case len(open) > 0:
			gone = true
		}
		break
	}
	r.finish(op, answer[T]{}, errNoAnswer) // if still open: a Redis failure, or gone
}

// refreshGate is this process's memory of background refreshes: which
// keys it is refreshing, and when a key's last refresh failed, so that a
// key is refreshed by one goroutine at a time and a failing source is not
// hit on every read.
type refreshGate struct {
	mu    sync.Mutex
	m     map[string]time.Time // key → zero while a refresh runs, else when the last one failed
	retry time.Duration        // how long a key is left alone after a failed refresh: LeaseTTL/3
}

func newRefreshGate(leaseTTL time.Duration) *refreshGate {
	return &refreshGate{m: make(map[string]time.Time), retry: leaseTTL / 3}
}

// start reports whether key may be refreshed now, and if so marks it
// running.
func (g *refreshGate) start(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if at, ok := g.m[key]; ok {
		if at.IsZero() || time.Since(at) < g.retry {
			return false
		}
	}
	g.m[key] = time.Time{}
	return true
}

// end marks key's refresh done; failed leaves the key alone for g.retry.
func (g *refreshGate) end(key string, failed bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !failed {
		delete(g.m, key)
		return
	}
	now := time.Now()
	g.m[key] = now
	if len(g.m) > 4096 { // keep the failure memory bounded
		for k, at := range g.m {
			if !at.IsZero() && now.Sub(at) >= g.retry {
				delete(g.m, k)
			}
		}
	}
}

// running reports whether a refresh of key runs.
func (g *refreshGate) running(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	at, ok := g.m[key]
	return ok && at.IsZero()
}

// busy reports whether any refresh runs.
func (g *refreshGate) busy() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, at := range g.m {
		if at.IsZero() {
			return true
		}
	}
	return false
}
