// Freshness: soft expiry, stale windows, XFetch early refresh and
// background refreshes.

package cacheaside

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"runtime/debug"
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

// refreshAsync reloads the value op read, in the background, under a
// refresh lease, unless this process is already refreshing the key or its
// last refresh failed less than refreshRetry ago. It goes through the
// engine's fill like any load. The goroutine belongs to the cache: Close
// cancels and waits for it.
func (c *Cache[T]) refreshAsync(parent context.Context, op *keyOp[T], src source[T]) {
	key, genKey := op.key, op.genKey
	if !c.startRefresh(key) {
		return
	}
	if !c.enter() {
		c.endRefresh(key, false)
		return
	}
	e := op.vw.e
	rop := &keyOp[T]{key: key, genKey: genKey, idx: op.idx, vw: view[T]{state: stReload, e: e}, gen: e.Gen, tok: newToken()}
	go func() {
		defer c.wg.Done()
		defer func() {
			// Loader panics are errors already (callFn); this catches one
			// in a codec or hook, which would otherwise end the process.
			if r := recover(); r != nil {
				c.report(parent, "refresh", key, panicIn("a codec, hook or Recorder", r, debug.Stack()))
				c.endRefresh(key, true)
			}
		}()
		ctx, cancel := context.WithCancel(context.WithValue(context.WithoutCancel(parent), backgroundKey{}, true))
		defer cancel()
		defer context.AfterFunc(c.stop, cancel)()
		ok, err := refreshLease(ctx, c.rdb, key, genKey, e.Token, rop.tok, c.opts.LeaseTTL, c.genTTL)
		if err != nil {
			if ctx.Err() == nil {
				c.redisError(ctx, "refresh", key, err)
			}
			// The script may have run and only its reply been lost: put the
			// value back rather than leave it "refreshing" with nobody on it.
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
			_ = c.guard.runScript(rctx, c.guard.writeBudget(1), releaseCall(key, rop.tok, c.keepOnFailure(&e), "")) // a write: the write budget
			rcancel()
			c.endRefresh(key, true)
			return
		}
		if !ok { // someone else is refreshing it, or it changed
			// A refresh holder still alive by Redis's clock: leave the key
			// alone for refreshRetry, however the clocks disagree.
			c.endRefresh(key, e.Kind == envelope.Refreshing)
			return
		}
		rop.held = true
		r := &missRun[T]{c: c, ctx: ctx, src: src, ops: []*keyOp[T]{rop}}
		r.loadAndFill(r.ops)
		failed := rop.err != nil && !errors.Is(rop.err, ErrNotFound)
		c.ev.refreshed(rop.err, failed)
		c.endRefresh(key, failed)
	}()
}

// refreshRetry is how long after a failed background refresh this process
// leaves a key alone, so a failing source is not hit on every read.
func (c *Cache[T]) refreshRetry() time.Duration { return c.opts.LeaseTTL / 3 }

func (c *Cache[T]) startRefresh(key string) bool {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	if at, ok := c.refreshes[key]; ok {
		if at.IsZero() || time.Since(at) < c.refreshRetry() {
			return false
		}
	}
	c.refreshes[key] = time.Time{}
	return true
}

func (c *Cache[T]) endRefresh(key string, failed bool) {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	if !failed {
		delete(c.refreshes, key)
		return
	}
	now := time.Now()
	c.refreshes[key] = now
	if len(c.refreshes) > 4096 { // keep the failure memory bounded
		for k, at := range c.refreshes {
			if !at.IsZero() && now.Sub(at) >= c.refreshRetry() {
				delete(c.refreshes, k)
			}
		}
	}
}
