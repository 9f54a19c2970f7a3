package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// gatedLoader returns version n on its n-th call; calls after the first
// block until open is closed, or fail with fail while failing is set.
type gatedLoader struct {
	calls   atomic.Int64
	open    chan struct{}
	failing atomic.Bool
}

var errSource = errors.New("source down")

func newGatedLoader() *gatedLoader { return &gatedLoader{open: make(chan struct{})} }

func (g *gatedLoader) load(ctx context.Context) (int64, error) {
	n := g.calls.Add(1)
	if n > 1 {
		select {
		case <-g.open:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if g.failing.Load() {
		return 0, errSource
	}
	return n, nil
}

func TestStaleWhileRevalidate(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		opts := &Options[int64]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Minute, NoJitter: true, NoEarlyRefresh: true}}
		c := newCache(t, b, opts)
		other := newCache(t, b, opts) // another process
		key := b.key("k")
		g := newGatedLoader()
		if v, _ := c.Get(ctx, key, g.load); v != 1 {
			t.Fatalf("first Get = %d", v)
		}
		clock.Advance(61 * time.Second) // past the TTL, inside the window
		for i := 0; i < 50; i++ {
			if v, err := c.Get(ctx, key, g.load); err != nil || v != 1 {
				t.Fatalf("stale Get = %d, %v; want the old value at once", v, err)
			}
		}
		waitFor(t, "the background refresh to call the loader", func() bool { return g.calls.Load() == 2 })
		var otherCalls atomic.Int64
		if v, _ := other.Get(ctx, key, func(context.Context) (int64, error) { otherCalls.Add(1); return -1, nil }); v != 1 || otherCalls.Load() != 0 {
			t.Fatalf("other instance got %d with %d loads; want the old value, no load (the refresh holds the lease)", v, otherCalls.Load())
		}
		close(g.open)
		waitFor(t, "the refresh to fill", func() bool { return c.Stats().Refreshes == 1 })
		if v, _ := c.Get(ctx, key, g.load); v != 2 {
			t.Fatalf("after the refresh Get = %d, want 2", v)
		}
		s := c.Stats()
		if g.calls.Load() != 2 || s.StaleServed != 50 || s.Misses != 1 {
			t.Fatalf("loads %d, stats %+v; want 2 loads, 50 stale served, 1 miss", g.calls.Load(), s)
		}
		// Past the stale window the value is not served: Get reloads.
		clock.Advance(3 * time.Minute)
		if v, _ := c.Get(ctx, key, g.load); v != 3 {
			t.Fatalf("past the window Get = %d, want a reload (3)", v)
		}
	})
}

func TestStaleIfError(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[int64]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleIfError: 5 * time.Minute, NoJitter: true, NoEarlyRefresh: true}})
		key := b.key("k")
		g := newGatedLoader()
		close(g.open)
		if v, _ := c.Get(ctx, key, g.load); v != 1 {
			t.Fatal("first Get")
		}
		g.failing.Store(true)
		clock.Advance(2 * time.Minute) // past the TTL: reload now, old value if that fails
		for i := 0; i < 3; i++ {
			v, err := c.Get(ctx, key, g.load)
			if err != nil || v != 1 {
				t.Fatalf("Get with the source down = %d, %v; want the old value", v, err)
			}
		}
		if s := c.Stats(); s.StaleIfError != 3 || g.calls.Load() != 4 {
			t.Fatalf("StaleIfError = %d after %d loads; want 3 after 4 (each Get retries the source)", s.StaleIfError, g.calls.Load())
		}
		clock.Advance(4 * time.Minute) // past the stale-if-error window
		if _, err := c.Get(ctx, key, g.load); !errors.Is(err, errSource) {
			t.Fatalf("past the window Get = %v, want the loader's error", err)
		}
		g.failing.Store(false)
		if v, err := c.Get(ctx, key, g.load); err != nil || v != 6 {
			t.Fatalf("source back: %d, %v", v, err)
		}
	})
}

// TestStaleIfErrorWithBackgroundRefresh: a failed background refresh keeps
// the old value serving, and the source is not retried on every read.
func TestStaleIfErrorWithBackgroundRefresh(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[int64]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Minute, StaleIfError: 10 * time.Minute, NoJitter: true, NoEarlyRefresh: true}})
		key := b.key("k")
		g := newGatedLoader()
		close(g.open)
		_, _ = c.Get(ctx, key, g.load)
		g.failing.Store(true)
		clock.Advance(90 * time.Second)
		if v, _ := c.Get(ctx, key, g.load); v != 1 {
			t.Fatal("stale not served")
		}
		waitFor(t, "the failed refresh", func() bool { return c.Stats().RefreshErrors == 1 })
		for i := 0; i < 20; i++ {
			if v, err := c.Get(ctx, key, g.load); err != nil || v != 1 {
				t.Fatalf("Get after a failed refresh = %d, %v", v, err)
			}
		}
		if n := g.calls.Load(); n != 2 {
			t.Fatalf("loader calls = %d, want 2: a failed refresh is not retried on every read", n)
		}
	})
}

func TestEarlyRefresh(t *testing.T) {
	for _, tc := range []struct {
		name  string
		p     Policy
		loads int64
	}{
		{"xfetch", Policy{TTL: time.Minute, Beta: 1e7, NoJitter: true}, 2},
		{"off", Policy{TTL: time.Minute, NoEarlyRefresh: true, NoJitter: true}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				ctx := context.Background()
				clock := newFakeClock()
				c := newCache(t, b, &Options[int64]{Clock: clock.Now, Policy: tc.p})
				key := b.key("k")
				g := newGatedLoader()
				close(g.open)
				_, _ = c.Get(ctx, key, g.load)
				clock.Advance(59 * time.Second) // one second before the TTL ends
				for i := 0; i < 10; i++ {
					if v, _ := c.Get(ctx, key, g.load); v != 1 && tc.loads == 1 {
						t.Fatalf("Get = %d", v)
					}
				}
				if tc.loads == 2 {
					// Beta is so large that every hit refreshes; one is enough.
					waitFor(t, "the early refresh", func() bool { return c.Stats().Refreshes >= 1 })
					clock.Advance(2 * time.Second) // the old value's TTL is over; the refreshed one's is not
					if v, _ := c.Get(ctx, key, g.load); v < 2 {
						t.Fatalf("after early refresh Get = %d, want a refreshed value", v)
					}
				}
				c.Close()
				if n := g.calls.Load(); (tc.loads == 1 && n != 1) || n < tc.loads {
					t.Fatalf("loads = %d, want %d", n, tc.loads)
				}
				if s := c.Stats(); s.Misses != 1 {
					t.Fatalf("Misses = %d, want 1: early refresh never makes a reader wait", s.Misses)
				}
			})
		})
	}
}

// TestCloseStopsBackgroundRefresh: Close cancels a refresh in flight and
// waits for it, leaving no goroutine behind (goleak checks at the end).
func TestCloseStopsBackgroundRefresh(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[int64]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoEarlyRefresh: true}})
		key := b.key("k")
		g := newGatedLoader() // the refresh blocks until its ctx ends
		_, _ = c.Get(ctx, key, g.load)
		clock.Advance(2 * time.Minute)
		_, _ = c.Get(ctx, key, g.load)
		waitFor(t, "the refresh to start", func() bool { return g.calls.Load() == 2 })
		closed := make(chan struct{})
		go func() { c.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not stop the background refresh")
		}
	})
}

// TestStaleWindowJitter: the Redis lifetime of a value is its jittered TTL
// plus its jittered stale window.
func TestStaleWindowJitter(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Policy: Policy{TTL: time.Hour, StaleWhileRevalidate: time.Hour, Jitter: 0.5}})
		rdb := b.client(t)
		var seen sync.Map
		for i := 0; i < 20; i++ {
			key := b.key("j" + string(rune('a'+i)))
			if err := c.Set(ctx, key, "v"); err != nil {
				t.Fatal(err)
			}
			ttl := rdb.PTTL(ctx, key).Val()
			if ttl < time.Hour-time.Second || ttl > 2*time.Hour {
				t.Fatalf("PTTL = %v, want within [1h, 2h]", ttl)
			}
			seen.Store(ttl/(10*time.Minute), true)
		}
		n := 0
		seen.Range(func(any, any) bool { n++; return true })
		if n < 2 {
			t.Fatal("lifetimes were not spread by jitter")
		}
	})
}

// TestRefreshHolderDies: the process refreshing a stale value dies (its
// refresh lease is never renewed, filled or released). Readers keep getting
// the stale value, past the lease's lifetime too, and once the lease's
// deadline has passed by Redis's clock, one of them takes the refresh over.
func TestRefreshHolderDies(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		const leaseTTL = 100 * time.Millisecond
		c := newCache(t, b, &Options[string]{Clock: clock.Now, LeaseTTL: leaseTTL,
			Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoEarlyRefresh: true, NoJitter: true}})
		key := b.key("refreshed")
		var calls atomic.Int64
		load := func(context.Context) (string, error) { return fmt.Sprintf("v%d", calls.Add(1)), nil }
		if v, err := c.Get(ctx, key, load); err != nil || v != "v1" {
			t.Fatalf("first Get = %q, %v", v, err)
		}
		clock.Advance(2 * time.Minute) // stale, inside stale-while-revalidate
		var e envelope.Entry
		if err := envelope.Decode(b.raw(t, key), &e); err != nil {
			t.Fatal(err)
		}
		dead := newToken()
		if ok, err := refreshLease(ctx, b.client(t), key, e.Token, dead, leaseTTL); err != nil || !ok {
			t.Fatalf("the doomed holder's refresh lease: %v %v", ok, err)
		}
		// The holder is gone. Past its lease's lifetime the value is still
		// there and still served, without a load while the deadline is ahead.
		b.advance(2 * leaseTTL)
		if ttl := b.client(t).PTTL(ctx, key).Val(); ttl <= 0 {
			t.Fatalf("the refreshing entry has PTTL %v after its holder died; the value must outlive the lease", ttl)
		}
		waitFor(t, "a reader to take the refresh over", func() bool {
			v, err := c.Get(ctx, key, load)
			if err != nil || (v != "v1" && v != "v2") {
				t.Fatalf("Get while the holder is dead = %q, %v; want the stale v1 (or the refreshed v2)", v, err)
			}
			var cur envelope.Entry
			return calls.Load() == 2 && envelope.Decode(b.raw(t, key), &cur) == nil && cur.Kind == envelope.Value && string(cur.Payload) == `"v2"`
		})
		if s := c.Stats(); s.Misses != 1 {
			t.Fatalf("Misses = %d; every Get after the first must have been served", s.Misses)
		}
	})
}

// boomCodec is JSON that panics in Marshal while boom is set.
type boomCodec struct {
	Codec[string]
	boom *atomic.Bool
}

func (c boomCodec) Marshal(v string) ([]byte, error) {
	if c.boom.Load() {
		panic("codec boom")
	}
	return c.Codec.Marshal(v)
}

// TestRefreshPanicReleases: a background refresh is a run of the engine,
// so a panic in the codec while it fills is the engine's to settle: the
// refresh lease is released (the value goes back from "refreshing", and
// another process can refresh it at once), the refresh is counted as
// failed, and the panic is reported as a *PanicError.
func TestRefreshPanicReleases(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		var boom atomic.Bool
		var panics atomic.Int64
		opts := &Options[string]{Clock: clock.Now, Codec: boomCodec{JSON[string](), &boom},
			Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoJitter: true, NoEarlyRefresh: true},
			OnError: func(_ context.Context, err error) {
				var pe *PanicError
				var oe *OpError
				if errors.As(err, &pe) && errors.As(err, &oe) && oe.Op == "refresh" {
					panics.Add(1)
				}
			}}
		c := newCache(t, b, opts)
		key := b.key("k")
		var n atomic.Int64
		load := func(context.Context) (string, error) { return fmt.Sprintf("v%d", n.Add(1)), nil }
		if v, err := c.Get(ctx, key, load); err != nil || v != "v1" {
			t.Fatalf("first Get = %q, %v", v, err)
		}
		clock.Advance(2 * time.Minute) // stale: served while one refresh runs
		boom.Store(true)
		if v, err := c.Get(ctx, key, load); err != nil || v != "v1" {
			t.Fatalf("stale Get = %q, %v; want the old value", v, err)
		}
		waitFor(t, "the failed refresh to be counted", func() bool { s := c.Stats(); return s.Refreshes == 1 && s.RefreshErrors == 1 })
		waitFor(t, "the value put back from refreshing", func() bool {
			var e envelope.Entry
			return envelope.Decode(b.raw(t, key), &e) == nil && e.Kind == envelope.Value && string(e.Payload) == `"v1"`
		})
		if panics.Load() != 1 {
			t.Fatalf("%d refresh panics reported, want 1", panics.Load())
		}
		// Not left "refreshing": another process refreshes it now, not
		// after the lease would have lapsed.
		boom.Store(false)
		other := newCache(t, b, opts)
		if v, err := other.Get(ctx, key, load); err != nil || v != "v1" {
			t.Fatalf("other's stale Get = %q, %v", v, err)
		}
		waitFor(t, "the other process's refresh", func() bool { return other.Stats().Refreshes == 1 })
		if v, err := other.Get(ctx, key, load); err != nil || v != "v3" {
			t.Fatalf("after the refresh Get = %q, %v; want v3", v, err)
		}
	})
}

// TestRefreshAfterTheHoldersFill: a reader read a refreshing entry (to take
// over its holder if it died), and the holder filled before the reader's
// refresh.lua ran. The fill carries the lease's token, so the reader's
// token names the fresh value now: refresh.lua must not take it, or the
// fresh value is reloaded at once. A reader that read a plain value under
// that token (a released refresh) does take it.
func TestRefreshAfterTheHoldersFill(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		c := newCache(t, b, &Options[string]{Policy: Policy{TTL: time.Minute, NoEarlyRefresh: true, NoJitter: true}})
		key := b.key("refilled")
		if _, err := c.Get(ctx, key, func(context.Context) (string, error) { return "v1", nil }); err != nil {
			t.Fatal(err)
		}
		var e envelope.Entry
		if err := envelope.Decode(b.raw(t, key), &e); err != nil {
			t.Fatal(err)
		}
		holder := newToken()
		if ok, err := refreshLease(ctx, rdb, key, e.Token, holder, time.Second); err != nil || !ok {
			t.Fatalf("the holder's refresh lease: %v %v", ok, err)
		}
		raw := b.raw(t, key) // what the reader read: refreshing, under holder
		entry := append([]byte(nil), raw...)
		entry[2] = byte(envelope.Value) // the header's kind byte: the fill writes a value
		if ok, err := fill(ctx, rdb, key, "", holder, entry, time.Minute, time.Minute); err != nil || !ok {
			t.Fatalf("the holder's fill: %v %v", ok, err)
		}
		l := &leases{ttl: time.Second, genTTL: time.Minute}
		n, err := l.refresh(key, "", holder, newToken(), true).on(ctx, rdb).Int64()
		if err != nil || n != 0 {
			t.Fatalf("refresh.lua over the holder's fill, for a reader of the refreshing entry = %d, %v; want 0", n, err)
		}
		n, err = l.refresh(key, "", holder, newToken(), false).on(ctx, rdb).Int64()
		if err != nil || n != 1 {
			t.Fatalf("refresh.lua over a value read as a value = %d, %v; want 1", n, err)
		}
	})
}
