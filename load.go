// Loader calls: the source a door loads with (Get's loader or GetMany's batch
// loader), the guarded call (timeout, panics, Goexit), and loads without Redis
// with their cap (MaxLoadsWhileDown).

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"
)

// source is what a door loads with: Get's loader, or GetMany's batch
// loader, which takes the positions (keyOp.idx) of its ids.
type source[T any] struct {
	one  Loader[T]
	many func(ctx context.Context, idx []int) (vals []T, found []bool, err error)
	per  GetOptions // the call's own choices (percall.go); a run's are its leader's
}

// load calls the loader once for ops. found[i] is false for an id the
// loader left out; err is the loader's own error, "not found" included.
func (s source[T]) load(ctx context.Context, ops []*keyOp[T]) (vals []T, found []bool, err error) {
	if s.one != nil {
		v, err := s.one(ctx)
		if err != nil {
			return nil, nil, err
		}
		return []T{v}, []bool{true}, nil
	}
	idx := make([]int, len(ops))
	for i, op := range ops {
		idx[i] = op.idx
	}
	return s.many(ctx, idx)
}

// call calls the loader once for ops, on its own goroutine under the load
// timeout (see callFn), and counts it. A "not found" error means none of
// the ids exist.
//
// soft, when not nil, is called on the caller's goroutine if the loader
// has not returned within SoftLoadTimeout (soft.go); the call goes on.
func (r *missRun[T]) call(ops []*keyOp[T], soft func()) (vals []T, found []bool, took time.Duration, err error) {
	type loaded struct {
		vals  []T
		found []bool
	}
	ctx := r.ctx
	if tr := r.c.opts.Tracer; tr != nil {
		span := Call{Kind: callLoad, Cache: r.c.name, Keys: len(ops), Background: ctx.Value(backgroundKey{}) != nil}
		if len(ops) == 1 {
			span.Key = ops[0].key
		}
		ctx = tr.Start(ctx, span)
		defer func() { tr.End(ctx, span, err) }()
	}
	start := r.c.opts.Clock() // load time feeds XFetch, a freshness decision
	lim := callLimits{timeout: r.c.opts.LoadTimeout}
	if soft != nil { // counted from the run's start, as a wait for another process's holder is
		lim.soft, lim.onSoft = max(time.Until(r.began.Add(r.c.opts.SoftLoadTimeout)), 0), soft
	}
	res, err := callFn(r.src.withReloading(ctx, r.c, ops), lim, func(ctx context.Context) (loaded, error) {
		v, f, err := r.src.load(ctx, ops)
		return loaded{v, f}, err
	})
	took = r.c.opts.Clock().Sub(start)
	r.c.ev.loaded(ctx, took, err, r.c.isNotFound(err))
	switch {
	case err != nil && r.c.isNotFound(err):
		return make([]T, len(ops)), make([]bool, len(ops)), took, nil
	case err != nil:
		return nil, nil, took, err
	}
	return res.vals, res.found, took, nil
}

// loadDown loads ops without Redis (it failed on them, or their holders
// never answered), in one loader call within one MaxLoadsWhileDown slot.
func (r *missRun[T]) loadDown(ops []*keyOp[T]) {
	c := r.c
	defer r.recoverLoad(ops)
	wctx, wcancel := context.WithTimeout(r.ctx, c.opts.LoadTimeout)
	done, err := c.loadSlot(wctx)
	wcancel()
	if err != nil {
		if errors.Is(err, ErrOverloaded) && c.stop.Err() != nil {
			err = ErrClosed
		}
		for _, op := range ops {
			r.fail(op, err)
		}
		return
	}
	defer done()
	r.loadUncached(ops)
}

// loadUncached calls the loader for ops and ends their flights with what
// it returned, storing nothing: loadDown's call, and a NoStore call's.
func (r *missRun[T]) loadUncached(ops []*keyOp[T]) {
	defer r.recoverLoad(ops)
	vals, found, _, err := r.call(ops, nil)
	for i, op := range ops {
		switch {
		case err != nil:
			r.fail(op, err)
		case !found[i]:
			r.finish(op, answer[T]{round: op.round}, ErrNotFound)
		default:
			r.finish(op, answer[T]{v: vals[i], round: op.round}, nil)
		}
	}
}

// recoverLoad fails ops with a *PanicError if a Recorder or IsNotFound
// panicked during a load without the cache. Deferred.
func (r *missRun[T]) recoverLoad(ops []*keyOp[T]) {
	if p := recover(); p != nil {
		err := panicIn("a Recorder or IsNotFound", p, debug.Stack())
		for _, op := range ops {
			r.fail(op, err)
		}
	}
}

// callLimits bounds a loader call: timeout ends it; onSoft, if set, is
// called once when soft has passed without an answer, and the call goes on.
type callLimits struct {
	timeout time.Duration
	soft    time.Duration
	onSoft  func()
}

// callFn runs fn on its own goroutine under lim.timeout and returns what
// it returned, or a *PanicError if it panicked, or errLoaderExited if it
// called runtime.Goexit, or the context's error if the timeout (or Close)
// came first. A loader that ignores its context is abandoned at that
// point: it keeps running until it returns, but nobody waits for it and
// its result is dropped.
func callFn[R any](ctx context.Context, lim callLimits, fn func(context.Context) (R, error)) (R, error) {
	ctx, cancel := context.WithTimeout(ctx, lim.timeout)
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
	var softC <-chan time.Time
	if lim.onSoft != nil {
		t := time.NewTimer(lim.soft)
		defer t.Stop()
		softC = t.C
	}
	for {
		select {
		case r := <-done:
			return r.v, r.err
		case <-softC:
			softC = nil
			lim.onSoft()
		case <-ctx.Done():
			var zero R
			return zero, fmt.Errorf("cacheaside: loader did not return within its context: %w", ctx.Err())
		}
	}
}

// loadSlot takes one of the MaxLoadsWhileDown slots for a load that
// bypasses Redis, waiting on ctx or failing fast with ErrOverloaded as the
// options say. The returned function gives the slot back.
func (c *Cache[T]) loadSlot(ctx context.Context) (func(), error) {
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	default:
	}
	if c.opts.Degradation.FailFastWhenCapped {
		c.ev.overloaded(ctx)
		return nil, ErrOverloaded
	}
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	case <-ctx.Done():
		c.ev.overloaded(ctx)
		return nil, fmt.Errorf("%w: %w", ErrOverloaded, ctx.Err())
	}
}
