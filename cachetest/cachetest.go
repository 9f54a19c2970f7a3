// Package cachetest helps test code that uses cacheaside: an in-memory
// Redis per test, a clock that moves the cache's time and Redis's time
// together, a wait for the local tier, and loaders that count their calls.
//
// A test of a service that caches tasks might read:
//
//	func TestTaskIsCached(t *testing.T) {
//		rdb, mr := cachetest.Redis(t)            // closed when the test ends
//		clock := cachetest.NewClock(mr)          // Redis TTLs follow it
//		tasks := cachetest.New(t, rdb, &cacheaside.Options[Task]{
//			Policy: cacheaside.Policy{TTL: time.Minute},
//			Clock:  clock.Now,
//		})
//		load := cachetest.Count(func(ctx context.Context) (Task, error) { return db.Task(ctx, 42) })
//
//		tasks.Get(ctx, "v1:tasks:42", load.Loader)
//		tasks.Get(ctx, "v1:tasks:42", load.Loader)
//		if load.Calls() != 1 {
//			t.Fatalf("%d loads, want 1: the second Get is a hit", load.Calls())
//		}
//		clock.Advance(time.Minute)                // the entry expires, in Redis too
//		tasks.Get(ctx, "v1:tasks:42", load.Loader)
//		if load.Calls() != 2 {
//			t.Fatal("no reload after the TTL")
//		}
//	}
//
// Every function takes a testing.TB (a *testing.T, *testing.B or
// *testing.F) and fails the test on an error, so a test reads as the
// scenario it checks.
package cachetest

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// TB is the part of testing.TB this package uses; *testing.T, *testing.B
// and *testing.F have it.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}

// Redis starts an in-memory Redis (miniredis) and returns a go-redis
// client on it, created as the library recommends (ContextTimeoutEnabled),
// and the server, for its test controls (FastForward, SetError, Close to
// simulate an outage, ...). Both are closed when the test ends. Each call
// starts a server of its own, so parallel tests never share keys.
func Redis(t TB) (*redis.Client, *miniredis.Miniredis) {
	t.Helper()
	mr := miniredis.NewMiniRedis()
	if err := mr.Start(); err != nil {
		t.Fatalf("cachetest: starting miniredis: %v", err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() {
		_ = rdb.Close()
		mr.Close()
	})
	return rdb, mr
}

// TestOpTimeout is the Redis command budget New gives caches whose options
// leave Degradation.OpTimeout unset.
const TestOpTimeout = 5 * time.Second

// New builds a Cache on rdb with opts (nil for the defaults) and closes it
// when the test ends. An error from cacheaside.New fails the test.
//
// Unless opts sets Degradation.OpTimeout, the cache gets a budget of
// TestOpTimeout per Redis command instead of the library's 50 ms: a test of
// your code must not fail because a busy CI machine answered the
// in-memory Redis late (the cache would then call the loader again, as it
// does when Redis is slow). Tests of how your code behaves when Redis is
// slow set Degradation themselves. opts is not modified.
func New[T any](t TB, rdb cacheaside.Redis, opts *cacheaside.Options[T]) *cacheaside.Cache[T] {
	t.Helper()
	var o cacheaside.Options[T]
	if opts != nil {
		o = *opts
	}
	if o.Degradation.OpTimeout == 0 {
		o.Degradation.OpTimeout = TestOpTimeout
	}
	c, err := cacheaside.New(rdb, &o)
	if err != nil {
		t.Fatalf("cachetest: cacheaside.New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Clock is a manual clock for Options.Clock that keeps a miniredis in
// step: Advance moves the cache's time and the server's (TTLs, TIME, the
// lease deadlines the library's scripts read) by the same amount, so an
// entry's soft expiry, its Redis TTL and the local tier's TTL pass
// together, without sleeping. It is safe for concurrent use.
type Clock struct {
	mu  sync.Mutex
	now time.Time
	mr  *miniredis.Miniredis
}

// NewClock returns a Clock that starts at the current time and drives mr
// (nil for a clock of the cache alone): mr's keys then expire only as the
// Clock advances.
func NewClock(mr *miniredis.Miniredis) *Clock {
	c := &Clock{now: time.Now(), mr: mr}
	if mr != nil {
		mr.SetTime(c.now)
		mr.ClockTTL(true)
	}
	return c
}

// Now returns the clock's time; pass it as Options.Clock.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock, and the miniredis it drives, forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	if c.mr != nil {
		c.mr.SetTime(c.now)
	}
}

// WaitLocal waits until c's local tier is live (its invalidation bus is
// confirmed; see Cache.WaitLocal), and fails the test after 10 seconds. A
// test that expects local hits right after New must wait: until the bus is
// confirmed, Gets read Redis.
func WaitLocal(t TB, c interface {
	WaitLocal(context.Context) error
}) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.WaitLocal(ctx); err != nil {
		t.Fatalf("cachetest: waiting for the local tier: %v", err)
	}
}

// Loads wraps a loader and counts its calls.
type Loads[T any] struct {
	fn    cacheaside.Loader[T]
	calls atomic.Int64
}

// Count returns a counting wrapper of fn; pass its Loader method to Get.
func Count[T any](fn cacheaside.Loader[T]) *Loads[T] { return &Loads[T]{fn: fn} }

// Value returns a counting loader that always returns v.
func Value[T any](v T) *Loads[T] {
	return Count(func(context.Context) (T, error) { return v, nil })
}

// NotFound returns a counting loader that reports the item absent.
func NotFound[T any]() *Loads[T] {
	return Count(func(context.Context) (T, error) {
		var zero T
		return zero, cacheaside.ErrNotFound
	})
}

// Loader calls the wrapped loader and counts the call.
func (l *Loads[T]) Loader(ctx context.Context) (T, error) {
	l.calls.Add(1)
	return l.fn(ctx)
}

// Calls returns how many times Loader was called.
func (l *Loads[T]) Calls() int { return int(l.calls.Load()) }

// BatchLoads wraps a batch loader for GetMany and records its calls.
type BatchLoads[K comparable, T any] struct {
	fn    cacheaside.BatchLoader[K, T]
	mu    sync.Mutex
	asked [][]K
}

// CountBatch returns a recording wrapper of fn; pass its Loader method to
// GetMany.
func CountBatch[K comparable, T any](fn cacheaside.BatchLoader[K, T]) *BatchLoads[K, T] {
	return &BatchLoads[K, T]{fn: fn}
}

// Loader calls the wrapped batch loader and records the ids it was given.
func (b *BatchLoads[K, T]) Loader(ctx context.Context, ids []K) (map[K]T, error) {
	b.mu.Lock()
	b.asked = append(b.asked, append([]K(nil), ids...))
	b.mu.Unlock()
	return b.fn(ctx, ids)
}

// Calls returns how many times Loader was called.
func (b *BatchLoads[K, T]) Calls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.asked)
}

// Asked returns the ids of each call, in call order.
func (b *BatchLoads[K, T]) Asked() [][]K {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([][]K, len(b.asked))
	for i, ids := range b.asked {
		out[i] = append([]K(nil), ids...)
	}
	return out
}
