// Package flight deduplicates concurrent work by key, like
// golang.org/x/sync/singleflight, with one thing that package cannot do:
// Join tells the caller at once whether it leads a new flight or joined a
// running one. A batch needs that to know, before it calls its loader,
// which keys are its own to load and which it waits for, without ever
// waiting on a flight that waits on it.
package flight

import (
	"sync"
	"sync/atomic"
)

// Group deduplicates concurrent calls by key. The zero value is ready to use.
type Group[T any] struct {
	mu sync.Mutex
	m  map[string]*Call[T]
}

// Call is one flight. Its result is readable once Done is closed; an early
// result, once Early is closed.
type Call[T any] struct {
	done chan struct{}
	val  T
	err  error

	early    chan struct{}
	earlyVal T
	earlyErr error
	answered atomic.Bool // early is being or has been closed
}

// Done is closed when the flight has finished.
func (c *Call[T]) Done() <-chan struct{} { return c.done }

// Result returns what the flight produced; call it after Done is closed.
func (c *Call[T]) Result() (T, error) { return c.val, c.err }

// Early is closed when the flight has a first result: an early one the
// leader published, or its final one if it finished without. Waiting on
// Early alone (not on Early and Done in one select) keeps the wake-up of
// many waiters cheap: each dequeues from one channel.
func (c *Call[T]) Early() <-chan struct{} { return c.early }

// EarlyResult returns the first result; call it after Early is closed.
func (c *Call[T]) EarlyResult() (T, error) { return c.earlyVal, c.earlyErr }

// Finished reports whether Done is closed.
func (c *Call[T]) Finished() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Publish records an early result of c and wakes those waiting on Early,
// unless c already has a first result (an earlier Publish, or Finish); it
// reports whether it did. The flight goes on, and later Joins for the key
// still join it. When it does, before (if not nil) runs first, before any
// waiter wakes: a count the waiters may read is then already made.
func (c *Call[T]) Publish(v T, err error, before func()) bool {
	if !c.answered.CompareAndSwap(false, true) {
		return false
	}
	if before != nil {
		before()
	}
	c.earlyVal, c.earlyErr = v, err
	close(c.early)
	return true
}

// Join returns the running flight for key, or starts one and returns it
// with leader true. A leader must call Finish exactly once.
func (g *Group[T]) Join(key string) (c *Call[T], leader bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c, ok := g.m[key]; ok {
		return c, false
	}
	if g.m == nil {
		g.m = make(map[string]*Call[T])
	}
	c = &Call[T]{done: make(chan struct{}), early: make(chan struct{})}
	g.m[key] = c
	return c, true
}

// Finish records the result of the flight c for key and wakes everyone
// waiting on it. Later Joins for key start a new flight.
func (g *Group[T]) Finish(key string, c *Call[T], v T, err error) {
	g.mu.Lock()
	if g.m[key] == c {
		delete(g.m, key)
	}
	g.mu.Unlock()
	c.val, c.err = v, err
	if c.answered.CompareAndSwap(false, true) {
		c.earlyVal, c.earlyErr = v, err
		close(c.early)
	}
	close(c.done)
}

// Forget makes the next call for key start a new flight; callers of the
// current one still get its result.
func (g *Group[T]) Forget(key string) {
	g.mu.Lock()
	delete(g.m, key)
	g.mu.Unlock()
}
