// The miss engine: leases, waiting for other holders, loads, fills,
// releases, the stale fallback and loads while Redis is down.

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// run is the body of a shared load: take the lease (or wait for whoever
// holds it), call the loader, fill or release. parent is the context of
// the Get that started it; run uses its values, never its cancellation. vw
// is what that Get read.
func (c *Cache[T]) run(parent context.Context, key, genKey string, load Loader[T], vw view[T], redisDown bool, fs *flightState) (v T, err error) {
	var zero T
	if !c.enter() {
		return zero, ErrClosed
	}
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(c.stop, cancel)()
	defer func() { err = c.closedErr(err) }()

	if redisDown {
		fs.observe() // the loader reads the source now, with no entry to vouch for it
		return c.loadUncached(ctx, load)
	}
	tok := newToken()
	lease := leaseEntry(tok, c.opts.Codec.Format())
	replace := vw.replace
	var (
		waitStart time.Time
		delay     = c.opts.PollMin
		waitCap   = c.opts.LoadTimeout + c.opts.LeaseTTL
	)
	for {
		if vw.state == stReload && vw.e.Kind == envelope.Value {
			// A value due for reload: take the lease on it in place,
			// keeping it to serve if the reload fails.
			fs.observe()
			ok, err := refreshLease(ctx, c.rdb, key, genKey, vw.e.Token, tok, c.opts.LeaseTTL, c.genTTL)
			if ok {
				fs.tok.Store(&tok)
			}
			if err != nil {
				got, err := c.afterRedisError(ctx, "refresh", key, tok, load, err, c.keepOnFailure(&vw.e))
				return c.orStale(got, err, &vw)
			}
			if ok {
				c.waited(waitStart)
				got, stored, err := c.loadAndFill(ctx, key, genKey, vw.e.Gen, load, tok, c.keepOnFailure(&vw.e))
				if stored {
					fs.answer = tok
				}
				return c.orStale(got, err, &vw)
			}
		}
		fs.observe()
		held, gen, cur, err := acquire(ctx, c.rdb, key, genKey, lease, c.opts.LeaseTTL, replace, c.genTTL)
		if err != nil {
			return c.afterRedisError(ctx, "acquire", key, tok, load, err, 0)
		}
		if held {
			fs.tok.Store(&tok)
			c.waited(waitStart)
			got, stored, err := c.loadAndFill(ctx, key, genKey, gen, load, tok, 0)
			if stored {
				fs.answer = tok
			}
			return got, err
		}
		vw = c.classify(ctx, key, cur, genView{namespaced: genKey != "", known: true, gen: gen}, c.opts.Clock())
		replace = vw.replace
		if vw.e.Token != (envelope.Token{}) {
			t := vw.e.Token
			fs.tok.Store(&t)
		}
		switch vw.state {
		case stFresh:
			c.waited(waitStart)
			fs.answer = vw.e.Token
			return vw.v, nil
		case stStale:
			c.waited(waitStart)
			c.stats.staleServed.Add(1)
			c.rec.StaleServed(c.name)
			fs.answer = vw.e.Token
			return vw.v, nil
		case stNotFound:
			c.waited(waitStart)
			fs.answer = vw.e.Token
			return zero, ErrNotFound
		case stMiss:
			continue // undecodable: acquire overwrites it next time
		case stReload:
			if vw.e.Kind == envelope.Value {
				continue // take the lease on it at the top of the loop
			}
		}
		// Another caller holds the lease: wait for its fill, or for the
		// lease to expire if the holder died.
		if waitStart.IsZero() {
			waitStart = time.Now()
			c.stats.leaseContended.Add(1)
			c.rec.LeaseContended(c.name)
		} else if time.Since(waitStart) > waitCap {
			// The holder neither filled nor let its lease lapse in the time
			// a load may take: answer from the source rather than wait on.
			c.waited(waitStart)
			return c.loadUncached(ctx, load)
		}
		if err := sleep(ctx, jitter(delay)); err != nil {
			return zero, err
		}
		delay = min(2*delay, c.opts.PollMax)
	}
}

// closedErr turns the cancellation Close causes into ErrClosed.
func (c *Cache[T]) closedErr(err error) error {
	if err != nil && c.stop.Err() != nil && errors.Is(err, context.Canceled) {
		return ErrClosed
	}
	return err
}

// afterRedisError handles a failed lease script: Close's cancellation is
// returned as is; anything else is reported, the lease the script may have
// taken before its reply was lost is dropped, and the loader answers.
// keep is how long a value the script may have turned into a refreshing
// entry should live on once put back.
func (c *Cache[T]) afterRedisError(ctx context.Context, op, key string, tok envelope.Token, load Loader[T], err error, keep time.Duration) (T, error) {
	if cerr := ctx.Err(); cerr != nil {
		var zero T
		return zero, cerr
	}
	c.redisError(ctx, op, key, err)
	c.releaseLater(key, tok, keep)
	if c.opts.OnRedisDown == FailClosed {
		var zero T
		return zero, unavailable(err)
	}
	return c.loadUncached(ctx, load)
}

// unavailable is the FailClosed error for a Redis failure err.
func unavailable(err error) error {
	if errors.Is(err, ErrRedisUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrRedisUnavailable, err)
}

// releaseLater drops tok's lease in the background (best effort, within
// the budget), off the caller's path: a lease script whose reply was lost
// may have taken it, or a fill failed and other processes would otherwise
// wait for it to expire. Close waits for it.
func (c *Cache[T]) releaseLater(key string, tok envelope.Token, keep time.Duration) {
	if !c.enter() {
		return
	}
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(c.stop), c.opts.LeaseTTL)
		defer cancel()
		_, _ = release(ctx, c.rdb, key, tok, keep)
	}()
}

func (c *Cache[T]) waited(start time.Time) {
	if !start.IsZero() {
		c.rec.Waited(c.name, time.Since(start))
	}
}

// loadAndFill calls the loader while holding tok's lease and stores the
// outcome: a value, a tombstone, or nothing (the lease is released; a
// refreshing entry goes back to a plain value that lives for keep more).
// stored reports whether the outcome is now in Redis under tok.
func (c *Cache[T]) loadAndFill(ctx context.Context, key, genKey string, gen envelope.Gen, load Loader[T], tok envelope.Token, keep time.Duration) (v T, stored bool, err error) {
	var zero T
	var snap localSnap
	if c.local != nil {
		snap = c.local.snap(key, genKey)
	}
	stopExtend := c.keepLease(ctx, key, tok)
	v, took, err := c.callLoader(ctx, load)
	stopExtend()
	if h := c.hooks; h != nil && h.beforeFill != nil {
		h.beforeFill(key)
	}
	// Fill and release must happen even if Close cancelled ctx.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	defer cancel()
	p := c.opts.Policy
	if err != nil {
		if !c.isNotFound(err) {
			c.release(wctx, key, tok, keep)
			return zero, false, err
		}
		if p.NoNegativeCache {
			c.release(wctx, key, tok, 0)
			return zero, false, ErrNotFound
		}
		ttl := p.jitter(p.NegativeTTL)
		soft := c.opts.Clock().Add(ttl)
		stored = c.store(wctx, key, genKey, tok, tombstone(tok, c.opts.Codec.Format(), gen, soft), ttl)
		if stored {
			c.putLocal(key, zero, true, soft.UnixMilli(), snap)
		}
		return zero, stored, ErrNotFound
	}
	entry, ttl, merr := c.encode(v, tok, gen, took)
	if merr != nil {
		c.stats.notCached.Add(1)
		c.rec.NotCached(c.name)
		c.report(ctx, "encode", key, merr)
		c.release(wctx, key, tok, keep)
		return v, false, nil
	}
	stored = c.store(wctx, key, genKey, tok, entry, ttl)
	if stored {
		c.putLocal(key, v, false, softExpiry(entry), snap)
	}
	return v, stored, nil
}

// softExpiry reads the soft expiry back from an encoded entry.
func softExpiry(entry []byte) int64 {
	var e envelope.Entry
	if envelope.Decode(entry, &e) != nil {
		return 0
	}
	return e.SoftExpiry
}

// keepLocal stores what a read found (a fresh value or a tombstone) in the
// local tier, if there is one.
func (c *Cache[T]) keepLocal(key string, vw *view[T], now time.Time, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: vw.v, notFound: vw.state == stNotFound, exp: c.local.expiry(now.UnixNano(), vw.e.SoftExpiry)}, snap)
}

// putLocal stores a value (or "not found") this process just filled.
func (c *Cache[T]) putLocal(key string, v T, notFound bool, soft int64, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: v, notFound: notFound, exp: c.local.expiry(c.opts.Clock().UnixNano(), soft)}, snap)
}

// encode builds the value entry for v and the lifetime to give it in
// Redis: the jittered TTL plus the jittered stale window.
func (c *Cache[T]) encode(v T, tok envelope.Token, gen envelope.Gen, took time.Duration) ([]byte, time.Duration, error) {
	payload, err := c.opts.Codec.Marshal(v)
	if err == nil && len(payload) > c.opts.MaxValueSize {
		err = fmt.Errorf("%w: %d bytes, MaxValueSize %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if err != nil {
		return nil, 0, err
	}
	p := c.opts.Policy
	ttl := p.jitter(p.TTL)
	life := ttl
	if w := p.staleWindow(); w > 0 {
		life += p.jitter(w)
	}
	return envelope.Encode(&envelope.Entry{
		Kind:       envelope.Value,
		Format:     c.opts.Codec.Format(),
		Token:      tok,
		SoftExpiry: c.opts.Clock().Add(ttl).UnixMilli(),
		LoadMillis: uint32(min(took.Milliseconds(), 1<<32-1)),
		Gen:        gen,
		Payload:    payload,
	}), life, nil
}

// store fills key with entry if tok's lease is still there, and reports
// whether it did.
func (c *Cache[T]) store(ctx context.Context, key, genKey string, tok envelope.Token, entry []byte, ttl time.Duration) bool {
	if h := c.hooks; h != nil && h.noTokenCheck {
		if err := c.rdb.Set(ctx, key, entry, ttl).Err(); err != nil {
			c.redisError(ctx, "fill", key, err)
			return false
		}
		return true
	}
	ok, err := fill(ctx, c.rdb, key, genKey, tok, entry, ttl, c.genTTL)
	switch {
	case err != nil:
		c.redisError(ctx, "fill", key, err)
		c.releaseLater(key, tok, 0) // or other processes wait out the lease
	case !ok:
		c.stats.fillsRejected.Add(1)
		c.rec.FillRejected(c.name)
	}
	return ok && err == nil
}

func (c *Cache[T]) release(ctx context.Context, key string, tok envelope.Token, keep time.Duration) {
	if _, err := release(ctx, c.rdb, key, tok, keep); err != nil {
		c.redisError(ctx, "release", key, err)
	}
}

// keepLease renews tok's lease every LeaseTTL/3 until the returned stop is
// called (it waits for the renewing goroutine to end) or the lease is gone.
func (c *Cache[T]) keepLease(ctx context.Context, key string, tok envelope.Token) (stop func()) {
	return c.renewing(ctx, func(ctx context.Context) bool {
		ok, err := extend(ctx, c.rdb, key, tok, c.opts.LeaseTTL)
		if err != nil {
			if ctx.Err() != nil {
				return false
			}
			c.redisError(ctx, "extend", key, err)
			return true
		}
		return ok // false: revoked, and the fill will be refused too
	})
}

// renewing runs renew every LeaseTTL/3 on its own goroutine, until renew
// returns false or the returned stop is called (stop waits for the
// goroutine to end).
func (c *Cache[T]) renewing(ctx context.Context, renew func(context.Context) bool) (stop func()) {
	if h := c.hooks; h != nil && h.noExtend {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(c.opts.LeaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if !renew(ctx) {
				return
			}
		}
	}()
	return func() { cancel(); <-done }
}

// loadUncached calls the loader without touching Redis, for when Redis
// failed: the caller still gets an answer, within MaxLoadsWhileDown.
func (c *Cache[T]) loadUncached(ctx context.Context, load Loader[T]) (T, error) {
	wctx, cancel := context.WithTimeout(ctx, c.opts.LoadTimeout)
	done, err := c.loadSlot(wctx)
	cancel()
	if err != nil {
		var zero T
		return zero, err
	}
	defer done()
	v, _, err := c.callLoader(ctx, load)
	if err != nil && c.isNotFound(err) {
		return v, ErrNotFound
	}
	return v, err
}

// callLoader runs load on its own goroutine under the load timeout and
// returns what it returned, or a *PanicError if it panicked, or
// errLoaderExited if it called runtime.Goexit, or the context's error if
// the timeout (or Close) came first. A loader that ignores its context is
// abandoned at that point: it keeps running until it returns, but nobody
// waits for it and its result is dropped.
func (c *Cache[T]) callLoader(ctx context.Context, load Loader[T]) (v T, took time.Duration, err error) {
	start := c.opts.Clock() // load time feeds XFetch, a freshness decision
	v, err = callFn(ctx, c.opts.LoadTimeout, load)
	took = c.opts.Clock().Sub(start)
	c.loaded(took, err)
	return v, took, err
}

// callFn is callLoader's guard for any loader: fn on its own goroutine
// under timeout, with panics, Goexit and an ignored context turned into
// errors.
func callFn[R any](ctx context.Context, timeout time.Duration, fn func(context.Context) (R, error)) (R, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type result struct {
		v   R
		err error
	}
	done := make(chan result, 1)
	go func() {
		normal := false
		defer func() {
			if normal {
				return
			}
			if r := recover(); r != nil {
				done <- result{err: &PanicError{Value: r, Stack: debug.Stack()}}
				return
			}
			done <- result{err: errLoaderExited}
		}()
		v, err := fn(ctx)
		normal = true
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		var zero R
		return zero, fmt.Errorf("cacheaside: loader did not return within its context: %w", ctx.Err())
	}
}

// jitter returns d scaled by a random factor in [0.5, 1.5).
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.5 + rand.Float64()))
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

// finish ends the flight it leads with a.
func finish[K comparable, T any](c *Cache[T], it *batchItem[K, T], a answer[T], err error) {
	it.done = true
	a.fs = it.fs
	c.endFlight(it.key, it.fs)
	c.group.Finish(it.key, it.call, a, err)
}

// loadBatch runs the flights a GetMany leads, in rounds: one pipeline of
// lease scripts for every key still open, then, together, one loader call
// for the keys whose leases it got (filled in one pipeline) and one for
// the keys Redis failed on (not cached). Keys another process holds the
// lease on are polled again in the next round, with the backoff Get uses,
// so however many of them there are, each round makes at most one call of
// each kind. Like run, it works on a context detached from the caller's
// cancellation, and every flight it leads ends, whatever happens.
func loadBatch[K comparable, T any](parent context.Context, c *Cache[T], owned []*batchItem[K, T], load BatchLoader[K, T]) {
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(c.stop, cancel)()
	fail := c.closedErr
	var mu sync.Mutex // the down loads finish items from their own goroutine
	defer func() {
		var err error = errors.New("cacheaside: batch load ended without an answer")
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
		mu.Lock()
		defer mu.Unlock()
		for _, it := range owned {
			if !it.done {
				if it.held {
					c.releaseLater(it.key, it.tok, it.keep(c))
				}
				finish(c, it, answer[T]{}, err)
			}
		}
	}()

	var down, open []*batchItem[K, T]
	for _, it := range owned {
		it.tok = newToken()
		if it.down {
			it.fs.observe() // the loader reads the source now, with no entry to vouch for it
			down = append(down, it)
		} else {
			open = append(open, it)
		}
	}
	var (
		waitStart time.Time
		delay     = c.opts.PollMin
		waitCap   = c.opts.LoadTimeout + c.opts.LeaseTTL
	)
	for {
		var held []*batchItem[K, T]
		if len(open) > 0 {
			var failed []*batchItem[K, T]
			held, open, failed = leaseRound(ctx, c, open, fail)
			down = append(down, failed...)
		}
		var wg sync.WaitGroup
		if len(down) > 0 {
			items := down
			down = nil
			wg.Go(func() { loadDown(ctx, c, items, load, fail, &mu) })
		}
		if len(held) > 0 {
			fillBatch(ctx, c, held, load, fail)
		}
		wg.Wait()
		if len(open) == 0 {
			return
		}
		// Other processes hold leases on the rest: wait for their fills.
		if waitStart.IsZero() {
			waitStart = time.Now()
			c.stats.leaseContended.Add(uint64(len(open)))
			c.rec.LeaseContended(c.name)
		} else if time.Since(waitStart) > waitCap {
			// The holders neither filled nor let their leases lapse in the
			// time a load may take: answer from the source.
			c.waited(waitStart)
			down, open = open, nil
			continue
		}
		if err := sleep(ctx, jitter(delay)); err != nil {
			for _, it := range open {
				v, err := c.orStale(it.vw.v, fail(err), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
			}
			return
		}
		delay = min(2*delay, c.opts.PollMax)
	}
}

// leaseRound sends the lease scripts of items in one pipeline. It finishes
// the items whose key turned out to hold an answer, and returns those it
// now holds the lease on, those still being loaded elsewhere, and those
// Redis failed on (to load without Redis).
func leaseRound[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], fail func(error) error) (held, open, failed []*batchItem[K, T]) {
	calls := make([]scriptCall, len(items))
	for i, it := range items {
		it.fs.observe()
		if it.reload() {
			it.gen = it.vw.e.Gen
			calls[i] = refreshCall(it.key, it.genKey, it.vw.e.Token, it.tok, c.opts.LeaseTTL, c.genTTL)
		} else {
			calls[i] = acquireCall(it.key, it.genKey, leaseEntry(it.tok, c.opts.Codec.Format()), c.opts.LeaseTTL, it.vw.replace, c.genTTL)
		}
	}
	cmds := c.evalMany(ctx, calls)
	var failedOnce errorOnce
	for i, it := range items {
		var (
			ok  bool
			cur []byte
			err error
		)
		reload := it.reload()
		if reload {
			var n int64
			n, err = cmds[i].Int64()
			ok = n == 1
		} else {
			ok, it.gen, cur, err = acquireReply(cmds[i].Slice())
		}
		switch {
		case err != nil:
			if cerr := ctx.Err(); cerr != nil {
				v, err := c.orStale(it.vw.v, fail(cerr), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
				continue
			}
			failedOnce.add(it.key, err)
			c.releaseLater(it.key, it.tok, it.keep(c)) // the script may have run, its reply lost
			if c.opts.OnRedisDown == FailClosed {
				v, err := c.orStale(it.vw.v, unavailable(err), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
				continue
			}
			failed = append(failed, it)
		case ok:
			it.held = true
			tok := it.tok
			it.fs.tok.Store(&tok)
			held = append(held, it)
		case reload:
			// The value changed since it was read: look again, by acquire.
			it.vw = view[T]{staleOK: it.vw.staleOK, v: it.vw.v}
			open = append(open, it)
		default:
			vw := c.classify(ctx, it.key, cur, genView{namespaced: it.genKey != "", known: true, gen: it.gen}, c.opts.Clock())
			if vw.e.Token != (envelope.Token{}) {
				t := vw.e.Token
				it.fs.tok.Store(&t)
			}
			switch vw.state {
			case stFresh:
				finish(c, it, answer[T]{v: vw.v, tok: vw.e.Token}, nil)
			case stStale:
				c.stats.staleServed.Add(1)
				c.rec.StaleServed(c.name)
				finish(c, it, answer[T]{v: vw.v, tok: vw.e.Token}, nil)
			case stNotFound:
				finish(c, it, answer[T]{tok: vw.e.Token}, ErrNotFound)
			default:
				// Being loaded elsewhere, undecodable (replace names it),
				// or a value due for reload (refreshed next round).
				if vw.state == stLease {
					vw.v, vw.staleOK = it.vw.v, it.vw.staleOK
				}
				it.vw = vw
				open = append(open, it)
			}
		}
	}
	failedOnce.report(ctx, c, "acquire")
	return held, open, failed
}

// loadDown loads items without Redis (it failed on them), in one loader
// call within one MaxLoadsWhileDown slot, and finishes them.
func loadDown[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], load BatchLoader[K, T], fail func(error) error, mu *sync.Mutex) {
	end := func(it *batchItem[K, T], v T, err error) {
		mu.Lock()
		defer mu.Unlock()
		if it.done { // loadBatch gave up on it after a panic
			return
		}
		v, err = c.orStale(v, fail(err), &it.vw)
		finish(c, it, answer[T]{v: v}, err)
	}
	defer func() {
		if r := recover(); r != nil { // a Recorder or IsNotFound that panicked
			err := &PanicError{Value: r, Stack: debug.Stack()}
			for _, it := range items {
				end(it, *new(T), err)
			}
		}
	}()
	wctx, wcancel := context.WithTimeout(ctx, c.opts.LoadTimeout)
	done, err := c.loadSlot(wctx)
	wcancel()
	if err != nil {
		if errors.Is(err, ErrOverloaded) && c.stop.Err() != nil {
			err = ErrClosed
		}
		for _, it := range items {
			end(it, *new(T), err)
		}
		return
	}
	defer done()
	m, _, err := callBatch(ctx, c, items, load)
	for _, it := range items {
		v, ok := m[it.ids[0]]
		switch {
		case err != nil:
			end(it, v, err)
		case !ok:
			end(it, v, ErrNotFound)
		default:
			end(it, v, nil)
		}
	}
}

// reload reports whether the item is a value due for reload, whose lease
// is taken in place (refresh.lua) so it can be served if the reload fails.
func (it *batchItem[K, T]) reload() bool {
	return it.vw.state == stReload && it.vw.e.Kind == envelope.Value
}

// keep is how long the item's value may live on if its reload fails.
func (it *batchItem[K, T]) keep(c *Cache[T]) time.Duration {
	if it.reload() {
		return c.keepOnFailure(&it.vw.e)
	}
	return 0
}

// callBatch calls load once for the items' ids, counted as one load.
func callBatch[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], load BatchLoader[K, T]) (map[K]T, time.Duration, error) {
	ids := make([]K, len(items))
	for i, it := range items {
		ids[i] = it.ids[0]
	}
	start := c.opts.Clock()
	m, err := callFn(ctx, c.opts.LoadTimeout, func(ctx context.Context) (map[K]T, error) { return load(ctx, ids) })
	took := c.opts.Clock().Sub(start)
	c.loaded(took, err)
	return m, took, err
}

// fillBatch loads the items whose leases the batch holds and fills them
// (values, tombstones for ids load left out) in one pipeline, or releases
// them when load fails.
func fillBatch[K comparable, T any](ctx context.Context, c *Cache[T], held []*batchItem[K, T], load BatchLoader[K, T], fail func(error) error) {
	extends := make([]scriptCall, len(held))
	for i, it := range held {
		extends[i] = extendCall(it.key, it.tok, c.opts.LeaseTTL)
	}
	for _, it := range held {
		if c.local != nil {
			it.snap = c.local.snap(it.key, it.genKey) // before the loader reads the source
		}
	}
	stop := c.keepLeases(ctx, extends)
	m, took, err := callBatch(ctx, c, held, load)
	stop()
	// Fill and release must happen even if Close cancelled ctx.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	defer cancel()
	p := c.opts.Policy
	if err != nil {
		calls := make([]scriptCall, len(held))
		for i, it := range held {
			calls[i] = releaseCall(it.key, it.tok, it.keep(c))
		}
		var failed errorOnce
		for i, cmd := range c.evalMany(wctx, calls) {
			if err := cmd.Err(); err != nil {
				failed.add(held[i].key, err)
			}
		}
		failed.report(wctx, c, "release")
		err = fail(err)
		for _, it := range held {
			v, err := c.orStale(it.vw.v, err, &it.vw)
			finish(c, it, answer[T]{v: v}, err)
		}
		return
	}
	type result struct {
		v   T
		err error
	}
	results := make([]result, len(held))
	calls := make([]scriptCall, len(held))
	fills := make([]bool, len(held))
	softs := make([]int64, len(held))
	for i, it := range held {
		v, ok := m[it.ids[0]]
		switch {
		case ok:
			results[i].v = v
			entry, ttl, merr := c.encode(v, it.tok, it.gen, took)
			if merr != nil {
				c.stats.notCached.Add(1)
				c.rec.NotCached(c.name)
				c.report(ctx, "encode", it.key, merr)
				calls[i] = releaseCall(it.key, it.tok, it.keep(c))
				continue
			}
			calls[i], fills[i], softs[i] = fillCall(it.key, it.genKey, it.tok, entry, ttl, c.genTTL), true, softExpiry(entry)
		case p.NoNegativeCache:
			results[i].err = ErrNotFound
			calls[i] = releaseCall(it.key, it.tok, 0)
		default:
			results[i].err = ErrNotFound
			ttl := p.jitter(p.NegativeTTL)
			soft := c.opts.Clock().Add(ttl)
			entry := tombstone(it.tok, c.opts.Codec.Format(), it.gen, soft)
			calls[i], fills[i], softs[i] = fillCall(it.key, it.genKey, it.tok, entry, ttl, c.genTTL), true, soft.UnixMilli()
		}
	}
	if h := c.hooks; h != nil {
		for i, it := range held {
			if h.beforeFill != nil {
				h.beforeFill(it.key)
			}
			if h.noTokenCheck && fills[i] {
				calls[i] = scriptCall{plainFillScript, calls[i].keys[:1], calls[i].args}
			}
		}
	}
	cmds := c.evalMany(wctx, calls)
	var failed errorOnce
	for i, it := range held {
		n, err := cmds[i].Int64()
		var tok envelope.Token
		switch {
		case err != nil:
			if fills[i] {
				c.releaseLater(it.key, it.tok, 0) // or other processes wait out the lease
			}
			failed.add(it.key, err)
		case fills[i] && n == 1:
			tok = it.tok
			c.putLocal(it.key, results[i].v, results[i].err != nil, softs[i], it.snap)
		case fills[i]:
			c.stats.fillsRejected.Add(1)
			c.rec.FillRejected(c.name)
		}
		it.fs.answer = tok
		finish(c, it, answer[T]{v: results[i].v, tok: tok}, results[i].err)
	}
	failed.report(wctx, c, "fill")
}

// keepLeases renews the batch's leases every LeaseTTL/3, in one pipeline,
// until the returned stop is called (it waits for the renewing goroutine).
func (c *Cache[T]) keepLeases(ctx context.Context, calls []scriptCall) (stop func()) {
	return c.renewing(ctx, func(ctx context.Context) bool {
		var failed errorOnce
		for i, cmd := range c.evalMany(ctx, calls) {
			if err := cmd.Err(); err != nil && ctx.Err() == nil {
				failed.add(calls[i].keys[0], err)
			}
		}
		failed.report(ctx, c, "extend")
		return true
	})
}

// plainFillScript fills without checking the lease: the broken protocol
// of testHooks.noTokenCheck.
var plainFillScript = redis.NewScript(`redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1`)
