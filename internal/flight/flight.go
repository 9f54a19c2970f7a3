// Package flight is a typed wrapper around golang.org/x/sync/singleflight.
//
// Callers must not let fn panic: x/sync re-panics a DoChan panic on a fresh
// goroutine, which ends the process. The cacheaside load path recovers loader
// panics itself and returns them as errors.
package flight

import "golang.org/x/sync/singleflight"

// Group deduplicates concurrent calls by key. The zero value is ready to use.
type Group[T any] struct {
	g singleflight.Group
}

// Result is what one flight produced.
type Result = singleflight.Result

// DoChan runs fn once for all concurrent callers with the same key. The
// returned channel is buffered, so a caller that stops listening never
// blocks the flight. Read the value with [Value].
func (g *Group[T]) DoChan(key string, fn func() (T, error)) <-chan Result {
	return g.g.DoChan(key, func() (any, error) { return fn() })
}

// Value returns the typed value of r.
func Value[T any](r Result) T {
	v, _ := r.Val.(T)
	return v
}

// Forget makes the next call for key start a new flight.
func (g *Group[T]) Forget(key string) { g.g.Forget(key) }
