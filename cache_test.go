package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// Compile-time proof that every go-redis client fits Redis.
var (
	_ Redis = (*redis.Client)(nil)
	_ Redis = (*redis.ClusterClient)(nil)
	_ Redis = (*redis.Ring)(nil)
)

func TestRedisInterfaceSatisfiedByClients(t *testing.T) {
	// The failover client of redis.NewFailoverClient is a *redis.Client.
	for _, c := range []any{(*redis.Client)(nil), (*redis.ClusterClient)(nil), (*redis.Ring)(nil)} {
		if _, ok := c.(Redis); !ok {
			t.Errorf("%T does not satisfy Redis", c)
		}
	}
}

func TestGetHitMissAndStats(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		ctx := context.Background()
		var n counter
		key := b.key("v1:tasks:1")
		for i := 0; i < 3; i++ {
			v, err := c.Get(ctx, key, n.load("one", 0))
			if err != nil || v != "one" {
				t.Fatalf("Get #%d = %q, %v; want one, nil", i, v, err)
			}
		}
		if got := n.calls.Load(); got != 1 {
			t.Fatalf("loader calls = %d, want 1", got)
		}
		s := c.Stats()
		if s.Hits != 2 || s.Misses != 1 || s.Loads != 1 || s.requests() != 3 {
			t.Fatalf("stats = %+v, want 2 hits, 1 miss, 1 load", s)
		}
		if hr := s.HitRate(); hr < 0.66 || hr > 0.67 {
			t.Fatalf("hit rate = %v, want 2/3", hr)
		}
		// The entry is a decodable value envelope with a TTL within jitter.
		var e envelope.Entry
		if err := envelope.Decode(b.raw(t, key), &e); err != nil || e.Kind != envelope.Value || string(e.Payload) != `"one"` {
			t.Fatalf("stored entry = %+v, %v", e, err)
		}
		ttl := b.client(t).PTTL(ctx, key).Val()
		if ttl > defaultTTL || ttl < time.Duration(float64(defaultTTL)*(1-defaultJitter))-time.Second {
			t.Fatalf("PTTL = %v, want within [%v, %v]", ttl, time.Duration(float64(defaultTTL)*(1-defaultJitter)), defaultTTL)
		}
	})
}

// TestStampedeOneProcess: 1,000 goroutines on one cold key, loader 50ms.
func TestStampedeOneProcess(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		var n counter
		key := b.key("hot")
		var wg sync.WaitGroup
		var bad atomic.Int64
		start := make(chan struct{})
		for i := 0; i < 1000; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				v, err := c.Get(context.Background(), key, n.load("v", 50*time.Millisecond))
				if err != nil || v != "v" {
					bad.Add(1)
				}
			}()
		}
		close(start)
		wg.Wait()
		if got := n.calls.Load(); got != 1 {
			t.Fatalf("loader calls = %d, want 1", got)
		}
		if bad.Load() != 0 {
			t.Fatalf("%d Gets failed", bad.Load())
		}
	})
}

// TestStampedeAcrossInstances: 4 Caches (own singleflight, own client)
// sharing one Redis, 250 goroutines each.
func TestStampedeAcrossInstances(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		var n counter
		key := b.key("hot")
		caches := make([]*Cache[string], 4)
		for i := range caches {
			caches[i] = newCache[string](t, b, nil)
			waitFor(t, "the wake channel", caches[i].wake.live.Load)
		}
		var (
			wg      sync.WaitGroup
			bad     atomic.Int64
			slowest atomic.Int64
		)
		start := make(chan struct{})
		for _, c := range caches {
			for i := 0; i < 250; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					t0 := time.Now()
					v, err := c.Get(context.Background(), key, n.load("v", 50*time.Millisecond))
					d := int64(time.Since(t0))
					for {
						cur := slowest.Load()
						if d <= cur || slowest.CompareAndSwap(cur, d) {
							break
						}
					}
					if err != nil || v != "v" {
						bad.Add(1)
					}
				}()
			}
		}
		close(start)
		wg.Wait()
		if got := n.calls.Load(); got != 1 {
			t.Fatalf("loader calls = %d across 4 instances, want 1", got)
		}
		if bad.Load() != 0 {
			t.Fatalf("%d Gets failed", bad.Load())
		}
		var contended uint64
		for _, c := range caches {
			contended += c.Stats().LeaseContended
		}
		t.Logf("%s: 1000 Gets, 1 load of 50ms, %d instances waited on another's lease, slowest Get %v",
			b.name, contended, time.Duration(slowest.Load()))
	})
}

// TestStaleSetRace is the race leases exist for: a reader loads the old
// row, a writer commits and invalidates, and the reader's late fill must be
// refused so the cache cannot keep the old row.
func TestStaleSetRace(t *testing.T) {
	type variant struct {
		name    string
		control bool // switch the token check off: the test must then see the stale value
	}
	for _, v := range []variant{{"leases", false}, {"control-no-token-check", true}} {
		t.Run(v.name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				ctx := context.Background()
				var db atomic.Int64 // the row's version
				db.Store(1)
				key := b.key("row")
				reader := newCache[int64](t, b, nil)
				writer := newCache[int64](t, b, nil)
				reader.hooks = &testHooks{fill: noTokenCheck(v.control)}

				inLoad := make(chan struct{})
				resume := make(chan struct{})
				loadOld := func(ctx context.Context) (int64, error) {
					row := db.Load() // reads version 1
					close(inLoad)
					<-resume // the writer commits and invalidates meanwhile
					return row, nil
				}
				got := make(chan int64)
				go func() {
					v, err := reader.Get(ctx, key, loadOld)
					if err != nil {
						t.Errorf("reader Get: %v", err)
					}
					got <- v
				}()
				<-inLoad
				db.Store(2)
				if _, err := writer.Invalidate(ctx, key); err != nil {
					t.Fatal(err)
				}
				close(resume)
				if old := <-got; old != 1 {
					t.Fatalf("reader got %d, want the row it read (1)", old)
				}
				next, err := writer.Get(ctx, key, func(context.Context) (int64, error) { return db.Load(), nil })
				if err != nil {
					t.Fatal(err)
				}
				if v.control {
					if next != 1 {
						t.Fatalf("control: without the token check the stale row should stick, got %d", next)
					}
					return
				}
				if next != 2 {
					t.Fatalf("after invalidate, Get = %d, want 2 (stale fill accepted)", next)
				}
				if r := reader.Stats().FillsRejected; r != 1 {
					t.Fatalf("FillsRejected = %d, want 1", r)
				}
			})
		})
	}
}

// TestStaleSetRaceLeaseExpired: the holder's lease expires during its load
// and another reader takes it over and fills the new row; the first fill
// must be refused. The control, with the token check off, must let the
// late fill overwrite the new row.
func TestStaleSetRaceLeaseExpired(t *testing.T) {
	for _, control := range []bool{false, true} {
		name := "leases"
		if control {
			name = "control-no-token-check"
		}
		t.Run(name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				ctx := context.Background()
				key := b.key("row")
				opts := &Options[int64]{LeaseTTL: 50 * time.Millisecond}
				slow := newCache(t, b, opts)
				slow.hooks = &testHooks{noExtend: true, fill: noTokenCheck(control)} // a holder stalled past its lease
				other := newCache(t, b, opts)

				inLoad := make(chan struct{})
				resume := make(chan struct{})
				done := make(chan struct{})
				go func() {
					defer close(done)
					v, _ := slow.Get(ctx, key, func(context.Context) (int64, error) {
						close(inLoad)
						<-resume
						return 1, nil
					})
					if v != 1 {
						t.Errorf("slow reader got %d, want 1", v)
					}
				}()
				<-inLoad
				b.advance(60 * time.Millisecond) // the lease expires
				v, err := other.Get(ctx, key, func(context.Context) (int64, error) { return 2, nil })
				if err != nil || v != 2 {
					t.Fatalf("takeover Get = %d, %v; want 2", v, err)
				}
				close(resume)
				<-done
				v, err = other.Get(ctx, key, func(context.Context) (int64, error) { return -1, nil })
				if control {
					if v != 1 {
						t.Fatalf("control: the late fill should have overwritten 2 with 1, got %d", v)
					}
					return
				}
				if err != nil || v != 2 {
					t.Fatalf("after both fills, Get = %d, %v; want 2", v, err)
				}
				if r := slow.Stats().FillsRejected; r != 1 {
					t.Fatalf("slow reader FillsRejected = %d, want 1", r)
				}
			})
		})
	}
}

// TestLeaseScriptsIdempotent: go-redis retries a command whose reply was
// lost; running acquire and fill twice with the same token must behave as
// running them once.
func TestLeaseScriptsIdempotent(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		key := b.key("k")
		tok := newToken()
		lease := leaseEntry(tok, formatJSON)
		for i := 0; i < 2; i++ {
			held, cur, err := acquire(ctx, rdb, key, tok, time.Second)
			if err != nil || !held || cur != nil {
				t.Fatalf("acquire #%d = %v, %q, %v; want held", i, held, cur, err)
			}
		}
		other := newToken()
		if held, cur, err := acquire(ctx, rdb, key, other, time.Second); err != nil || held || string(cur) != string(lease) {
			t.Fatalf("second holder: held=%v err=%v, want the first lease back", held, err)
		}
		entry := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatJSON, Token: tok, Payload: []byte(`1`)})
		for i := 0; i < 2; i++ {
			ok, err := fill(ctx, rdb, key, "", tok, entry, time.Minute, time.Minute)
			if err != nil || !ok {
				t.Fatalf("fill #%d = %v, %v; want ok", i, ok, err)
			}
		}
		if ok, _ := fill(ctx, rdb, key, "", other, entry, time.Minute, time.Minute); ok {
			t.Fatal("fill with a foreign token succeeded")
		}
		// Release and extend act only on a lease, never on the filled value.
		if ok, _ := release(ctx, rdb, key, tok, 0); ok {
			t.Fatal("release deleted a filled value")
		}
		if ok, _ := extend(ctx, rdb, key, tok, time.Hour); ok {
			t.Fatal("extend renewed a filled value")
		}
		if string(b.raw(t, key)) != string(entry) {
			t.Fatal("value changed")
		}
	})
}

func TestNegativeCaching(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		neg := 200 * time.Millisecond
		c := newCache(t, b, &Options[string]{Policy: Policy{NegativeTTL: neg, NoJitter: true}})
		key := b.key("missing")
		var calls atomic.Int64
		load := func(context.Context) (string, error) {
			calls.Add(1)
			return "", ErrNotFound
		}
		var wg sync.WaitGroup
		var wrong atomic.Int64
		for i := 0; i < 1000; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := c.Get(ctx, key, load); !errors.Is(err, ErrNotFound) {
					wrong.Add(1)
				}
			}()
		}
		wg.Wait()
		if wrong.Load() != 0 {
			t.Fatalf("%d Gets did not return ErrNotFound", wrong.Load())
		}
		if calls.Load() != 1 {
			t.Fatalf("loader calls = %d for 1,000 Gets of a missing id, want 1", calls.Load())
		}
		b.advance(neg + 50*time.Millisecond)
		if _, err := c.Get(ctx, key, load); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after negative TTL: %v", err)
		}
		if calls.Load() != 2 {
			t.Fatalf("loader calls after the negative TTL = %d, want 2", calls.Load())
		}
	})
}

func TestIsNotFoundMapsLoaderErrors(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		errNoRows := errors.New("sql: no rows in result set")
		c := newCache(t, b, &Options[string]{IsNotFound: func(err error) bool { return errors.Is(err, errNoRows) }})
		var calls atomic.Int64
		load := func(context.Context) (string, error) { calls.Add(1); return "", fmt.Errorf("query: %w", errNoRows) }
		for i := 0; i < 3; i++ {
			if _, err := c.Get(context.Background(), b.key("x"), load); err != ErrNotFound {
				t.Fatalf("Get = %v, want ErrNotFound itself", err)
			}
		}
		if calls.Load() != 1 {
			t.Fatalf("calls = %d, want 1", calls.Load())
		}
	})
}

func TestNoNegativeCache(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{Policy: Policy{NoNegativeCache: true}})
		var calls atomic.Int64
		load := func(context.Context) (string, error) { calls.Add(1); return "", ErrNotFound }
		for i := 0; i < 3; i++ {
			if _, err := c.Get(context.Background(), b.key("x"), load); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Get = %v", err)
			}
		}
		if calls.Load() != 3 {
			t.Fatalf("calls = %d, want 3 with negative caching off", calls.Load())
		}
		if b.raw(t, b.key("x")) != nil {
			t.Fatal("lease left behind")
		}
	})
}

func TestLoaderErrorNotCached(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("x")
		boom := errors.New("db down")
		var calls atomic.Int64
		for i := 0; i < 3; i++ {
			_, err := c.Get(context.Background(), key, func(context.Context) (string, error) { calls.Add(1); return "", boom })
			if !errors.Is(err, boom) {
				t.Fatalf("Get = %v, want the loader's error", err)
			}
			if raw := b.raw(t, key); raw != nil {
				t.Fatalf("after a loader error the key holds %q; want nothing (lease released)", raw)
			}
		}
		if calls.Load() != 3 {
			t.Fatalf("calls = %d, want 3: errors are never cached", calls.Load())
		}
		if s := c.Stats(); s.LoadErrors != 3 {
			t.Fatalf("LoadErrors = %d, want 3", s.LoadErrors)
		}
	})
}

// TestWaiterDeadline: a waiter with a 20ms deadline gives up on time while
// the shared load finishes for everyone else, and the first caller
// cancelling fails nobody else.
func TestWaiterDeadline(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("slow")
		var n counter
		load := n.load("v", 300*time.Millisecond)

		firstCtx, cancelFirst := context.WithCancel(context.Background())
		firstErr := make(chan error, 1)
		go func() {
			_, err := c.Get(firstCtx, key, load)
			firstErr <- err
		}()
		waitFor(t, "the first load to start", func() bool { return n.calls.Load() == 1 })

		others := make(chan error, 10)
		for i := 0; i < 10; i++ {
			go func() {
				v, err := c.Get(context.Background(), key, load)
				if err == nil && v != "v" {
					err = fmt.Errorf("got %q", v)
				}
				others <- err
			}()
		}
		cancelFirst()
		if err := <-firstErr; !errors.Is(err, context.Canceled) {
			t.Fatalf("first caller: %v, want context.Canceled", err)
		}

		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		t0 := time.Now()
		_, err := c.Get(ctx, key, load)
		took := time.Since(t0)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("20ms waiter: %v, want DeadlineExceeded", err)
		}
		if took > 250*time.Millisecond {
			t.Fatalf("20ms waiter returned after %v, before the load ended it should have", took)
		}
		for i := 0; i < 10; i++ {
			if err := <-others; err != nil {
				t.Fatalf("another caller failed: %v", err)
			}
		}
		if n.calls.Load() != 1 {
			t.Fatalf("loader calls = %d, want 1", n.calls.Load())
		}
		if v, err := c.Get(context.Background(), key, load); err != nil || v != "v" {
			t.Fatalf("after the load: %q, %v", v, err)
		}
	})
}

func TestLoaderPanic(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("p")
		var joins atomic.Int64
		c.hooks = &testHooks{joined: func(string) { joins.Add(1) }}
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		release := make(chan struct{})
		var calls atomic.Int64
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := c.Get(context.Background(), key, func(context.Context) (string, error) {
					calls.Add(1)
					<-release
					panic("boom")
				})
				errs <- err
			}()
		}
		waitFor(t, "every Get to join the flight", func() bool { return calls.Load() == 1 && joins.Load() == 20 })
		close(release)
		wg.Wait()
		close(errs)
		for err := range errs {
			var pe *PanicError
			if !errors.Is(err, ErrLoaderPanic) || !errors.As(err, &pe) || pe.Value != "boom" || len(pe.Stack) == 0 {
				t.Fatalf("Get = %v, want a *PanicError carrying boom and a stack", err)
			}
		}
		if raw := b.raw(t, key); raw != nil {
			t.Fatalf("lease not released after the panic: %q", raw)
		}
		v, err := c.Get(context.Background(), key, func(context.Context) (string, error) { return "ok", nil })
		if err != nil || v != "ok" {
			t.Fatalf("Get after the panic = %q, %v", v, err)
		}
	})
}

// TestLeaseHolderGone: a lease is taken and never filled (its holder died);
// waiters take over once it expires.
func TestLeaseHolderGone(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		key := b.key("orphan")
		leaseTTL := 100 * time.Millisecond
		if held, _, err := acquire(ctx, b.client(t), key, newToken(), leaseTTL); err != nil || !held {
			t.Fatalf("dead holder's acquire: %v %v", held, err)
		}
		c := newCache(t, b, &Options[string]{LeaseTTL: leaseTTL})
		var n counter
		type res struct {
			v   string
			err error
		}
		out := make(chan res, 5)
		for i := 0; i < 5; i++ {
			go func() {
				v, err := c.Get(ctx, key, n.load("v", 0))
				out <- res{v, err}
			}()
		}
		waitFor(t, "a waiter to meet the lease", func() bool { return c.Stats().LeaseContended > 0 })
		if n.calls.Load() != 0 {
			t.Fatal("a waiter loaded while the lease was live")
		}
		b.advance(leaseTTL + 20*time.Millisecond)
		for i := 0; i < 5; i++ {
			if r := <-out; r.err != nil || r.v != "v" {
				t.Fatalf("waiter: %q, %v", r.v, r.err)
			}
		}
		if n.calls.Load() != 1 {
			t.Fatalf("loader calls after takeover = %d, want 1", n.calls.Load())
		}
	})
}

// TestFaultLeaseWithoutTTL: a lease entry with no lifetime (written by
// hand, or by a crash mid-script) does not poison its key: the first Get
// takes it over and loads, well within a short caller deadline.
func TestFaultLeaseWithoutTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		for _, kind := range []string{"lease", "refreshing"} {
			key := b.key("no-ttl-" + kind)
			entry := leaseEntry(newToken(), formatJSON)
			if kind == "refreshing" {
				e := envelope.Entry{Kind: envelope.Refreshing, Format: formatJSON, Token: newToken(), SoftExpiry: time.Now().Add(-time.Hour).UnixMilli(), Payload: []byte(`"old"`)}
				entry = envelope.Encode(&e)
			}
			if err := b.client(t).Set(ctx, key, entry, 0).Err(); err != nil { // no PX
				t.Fatal(err)
			}
			c := newCache[string](t, b, nil)
			var n counter
			gctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			start := time.Now()
			v, err := c.Get(gctx, key, n.load("v", 0))
			cancel()
			if err != nil || v != "v" || n.calls.Load() != 1 {
				t.Fatalf("%s without a TTL: Get = %q, %v after %v with %d loads; want the loader's value", kind, v, err, time.Since(start), n.calls.Load())
			}
			if ttl := b.client(t).PTTL(ctx, key).Val(); ttl <= 0 {
				t.Fatalf("%s without a TTL: the filled entry has PTTL %v", kind, ttl)
			}
		}
	})
}

// TestLeaseRenewedDuringLongLoad: a load longer than LeaseTTL keeps its
// lease, so nobody else loads meanwhile.
func TestLeaseRenewedDuringLongLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("sleeps for real time")
	}
	forEachBackend(t, func(t *testing.T, b *backend) {
		if b.mr != nil {
			t.Skip("miniredis time only moves with FastForward")
		}
		key := b.key("long")
		opts := &Options[string]{LeaseTTL: 60 * time.Millisecond}
		a, c := newCache(t, b, opts), newCache(t, b, opts)
		var n counter
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = a.Get(context.Background(), key, n.load("v", 300*time.Millisecond))
		}()
		waitFor(t, "load", func() bool { return n.calls.Load() == 1 })
		v, err := c.Get(context.Background(), key, n.load("other", 0))
		<-done
		if err != nil || v != "v" || n.calls.Load() != 1 {
			t.Fatalf("second instance got %q, %v after %d loads; want v from the single renewed load", v, err, n.calls.Load())
		}
	})
}

func TestCorruptEntriesAreReloaded(t *testing.T) {
	valid := func(mut func(b []byte) []byte) []byte {
		b := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatJSON, Token: newToken(), Payload: []byte(`"x"`)})
		return mut(b)
	}
	cases := []struct {
		name string
		raw  []byte
	}{
		{"foreign string", []byte("hello, not ours")},
		{"empty", []byte{}},
		{"unknown format version", valid(func(b []byte) []byte { b[1] = 99; return b })},
		{"truncated header", valid(func(b []byte) []byte { return b[:20] })},
		{"bad payload", valid(func(b []byte) []byte { return append(b[:envelope.HeaderSize], `{"no`...) })},
		{"other codec", valid(func(b []byte) []byte { b[3] = formatMsgpack; return b })},
		{"unknown kind", valid(func(b []byte) []byte { b[2] = 77; return b })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				key := b.key("c")
				if err := b.client(t).Set(context.Background(), key, tc.raw, time.Minute).Err(); err != nil {
					t.Fatal(err)
				}
				var hooked atomic.Int64
				c := newCache(t, b, &Options[string]{OnError: func(_ context.Context, err error) {
					if errors.Is(err, ErrCorruptEntry) {
						hooked.Add(1)
					}
				}})
				var n counter
				v, err := c.Get(context.Background(), key, n.load("fresh", 0))
				if err != nil || v != "fresh" {
					t.Fatalf("Get = %q, %v; want fresh", v, err)
				}
				var e envelope.Entry
				if err := envelope.Decode(b.raw(t, key), &e); err != nil || e.Kind != envelope.Value || string(e.Payload) != `"fresh"` {
					t.Fatalf("entry not overwritten: %+v %v", e, err)
				}
				if s := c.Stats(); s.DecodeErrors != 1 || hooked.Load() != 1 {
					t.Fatalf("DecodeErrors = %d, hook calls = %d; want 1, 1", s.DecodeErrors, hooked.Load())
				}
				if v, _ := c.Get(context.Background(), key, n.load("again", 0)); v != "fresh" || n.calls.Load() != 1 {
					t.Fatalf("next Get = %q after %d loads, want a hit", v, n.calls.Load())
				}
			})
		})
	}
	t.Run("wrong type", func(t *testing.T) {
		forEachBackend(t, func(t *testing.T, b *backend) {
			key := b.key("h")
			b.client(t).HSet(context.Background(), key, "f", "v")
			c := newCache[string](t, b, nil)
			var n counter
			if v, err := c.Get(context.Background(), key, n.load("fresh", 0)); err != nil || v != "fresh" {
				t.Fatalf("Get = %q, %v", v, err)
			}
			if v, _ := c.Get(context.Background(), key, n.load("again", 0)); v != "fresh" {
				t.Fatalf("hash not replaced: %q", v)
			}
		})
	})
}

func TestRedisUnavailable(t *testing.T) {
	t.Run("miniredis SetError", func(t *testing.T) {
		b := &backend{}
		mr := miniredisRun(t)
		b.addr, b.mr = mr.Addr(), mr
		var hooked atomic.Int64
		// The breaker would open after five failures and skip Redis for a
		// second; this test is about the fallback itself.
		c := newCache(t, b, &Options[string]{OnError: func(context.Context, error) { hooked.Add(1) }, Degradation: Degradation{NoBreaker: true}})
		mr.SetError("LOADING Redis is loading the dataset in memory")
		var n counter
		for i := 0; i < 3; i++ {
			v, err := c.Get(context.Background(), "k", n.load("v", 0))
			if err != nil || v != "v" {
				t.Fatalf("Get = %q, %v; want the loader's value", v, err)
			}
		}
		if s := c.Stats(); s.RedisErrors != 3 || hooked.Load() != 3 || n.calls.Load() != 3 {
			t.Fatalf("RedisErrors = %d, hook = %d, loads = %d; want 3 each", s.RedisErrors, hooked.Load(), n.calls.Load())
		}
		if _, err := c.Invalidate(context.Background(), "k"); err == nil {
			t.Fatal("Invalidate during an outage returned nil")
		}
		if err := c.Set(context.Background(), "k", "v"); err == nil {
			t.Fatal("Set during an outage returned nil")
		}
		mr.SetError("")
		// The failed Invalidate and Set were queued; until their retry lands
		// this process's Gets of k load from the source.
		waitFor(t, "the queued invalidation to land", func() bool { return c.Stats().PendingInvals == 0 })
		if v, err := c.Get(context.Background(), "k", n.load("v", 0)); err != nil || v != "v" {
			t.Fatal(err)
		}
		if v, _ := c.Get(context.Background(), "k", n.load("v2", 0)); v != "v" {
			t.Fatal("not cached after recovery")
		}
	})
	t.Run("closed port", func(t *testing.T) {
		rdb := redis.NewClient(&redis.Options{Addr: closedAddr(t), ContextTimeoutEnabled: true, MaxRetries: -1})
		defer rdb.Close()
		c, err := New[string](rdb, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var n counter
		v, err := c.Get(context.Background(), "k", n.load("v", 0))
		if err != nil || v != "v" {
			t.Fatalf("Get = %q, %v; want the loader's value", v, err)
		}
		if _, err := c.Get(context.Background(), "missing", func(context.Context) (string, error) { return "", ErrNotFound }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("not found with Redis down: %v", err)
		}
	})
}

func TestTooLargeNotCached(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{MaxValueSize: 10})
		key := b.key("big")
		var n counter
		for i := 0; i < 2; i++ {
			if v, err := c.Get(context.Background(), key, n.load("a value longer than ten bytes", 0)); err != nil || len(v) < 10 {
				t.Fatalf("Get = %q, %v", v, err)
			}
		}
		if n.calls.Load() != 2 || c.Stats().NotCached != 2 || b.raw(t, key) != nil {
			t.Fatalf("loads = %d, NotCached = %d; want 2, 2 and nothing stored", n.calls.Load(), c.Stats().NotCached)
		}
		if err := c.Set(context.Background(), key, "a value longer than ten bytes"); !errors.Is(err, ErrValueTooLarge) {
			t.Fatalf("Set = %v, want ErrValueTooLarge", err)
		}
	})
}

func TestSetAndInvalidate(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		k1, k2, k3 := b.key("1"), b.key("2"), b.key("3")
		for _, k := range []string{k1, k2, k3} {
			if err := c.Set(ctx, k, "set:"+k); err != nil {
				t.Fatal(err)
			}
		}
		var n counter
		if v, _ := c.Get(ctx, k1, n.load("loaded", 0)); v != "set:"+k1 || n.calls.Load() != 0 {
			t.Fatalf("Get after Set = %q (%d loads)", v, n.calls.Load())
		}
		if n, err := c.Invalidate(ctx, k1, k2, k3, b.key("absent")); err != nil || n != 3 {
			t.Fatalf("Invalidate = %d, %v; want the 3 keys that existed", n, err)
		}
		if s := c.Stats(); s.Invalidations != 3 {
			t.Fatalf("Invalidations = %d, want 3", s.Invalidations)
		}
		for _, k := range []string{k1, k2, k3} {
			if b.raw(t, k) != nil {
				t.Fatalf("%s survived Invalidate", k)
			}
		}
		if _, err := c.Invalidate(ctx, k1, ""); !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("Invalidate with an empty key = %v", err)
		}
	})
}

// TestSetRevokesInFlightFill: a Set during a load wins over the load's fill.
func TestSetRevokesInFlightFill(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		key := b.key("k")
		inLoad, resume := make(chan struct{}), make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = c.Get(ctx, key, func(context.Context) (string, error) { close(inLoad); <-resume; return "old", nil })
		}()
		<-inLoad
		if err := c.Set(ctx, key, "new"); err != nil {
			t.Fatal(err)
		}
		close(resume)
		<-done
		if v, _ := c.Get(ctx, key, func(context.Context) (string, error) { return "loaded", nil }); v != "new" {
			t.Fatalf("Get = %q, want new", v)
		}
	})
}

func TestInvalidKeysAndNilLoader(t *testing.T) {
	mr := miniredisRun(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	c, err := New[string](rdb, &Options[string]{MaxKeySize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	load := func(context.Context) (string, error) { t.Fatal("loader called for an invalid key"); return "", nil }
	for _, k := range []string{"", "123456789"} {
		if _, err := c.Get(context.Background(), k, load); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Get(%q) = %v, want ErrInvalidKey", k, err)
		}
		if err := c.Set(context.Background(), k, "v"); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Set(%q) = %v, want ErrInvalidKey", k, err)
		}
	}
	if _, err := c.Get(context.Background(), "k", nil); err == nil {
		t.Error("Get with nil loader succeeded")
	}
	if n := len(mr.Keys()); n != 0 {
		t.Fatalf("%d keys written", n)
	}
}

func TestClose(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("k")
		started := make(chan struct{})
		errc := make(chan error, 1)
		go func() {
			_, err := c.Get(context.Background(), key, func(ctx context.Context) (string, error) {
				close(started)
				<-ctx.Done() // Close cancels the load
				return "", ctx.Err()
			})
			errc <- err
		}()
		<-started
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; !errors.Is(err, ErrClosed) {
			t.Fatalf("in-flight Get after Close = %v, want ErrClosed", err)
		}
		if b.raw(t, key) != nil {
			t.Fatal("Close left the lease behind")
		}
		_ = c.Close()
		if _, err := c.Get(context.Background(), key, func(context.Context) (string, error) { return "", nil }); !errors.Is(err, ErrClosed) {
			t.Fatalf("Get after Close = %v", err)
		}
		if err := c.Set(context.Background(), key, "v"); !errors.Is(err, ErrClosed) {
			t.Fatalf("Set after Close = %v", err)
		}
	})
}

func TestMsgpackCodecAndSwitch(t *testing.T) {
	type task struct {
		ID    int64    `msgpack:"id" json:"id"`
		Title string   `msgpack:"title" json:"title"`
		Tags  []string `msgpack:"tags" json:"tags"`
	}
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		key := b.key("t")
		want := task{ID: 42, Title: "Design caching layer", Tags: []string{"backend", "performance"}}
		mp := newCache(t, b, &Options[task]{Codec: Msgpack[task]()})
		load := func(context.Context) (task, error) { return want, nil }
		if _, err := mp.Get(ctx, key, load); err != nil {
			t.Fatal(err)
		}
		got, err := mp.Get(ctx, key, func(context.Context) (task, error) { return task{}, errors.New("not a hit") })
		if err != nil || got.Title != want.Title || len(got.Tags) != 2 {
			t.Fatalf("msgpack hit = %+v, %v", got, err)
		}
		js := newCache[task](t, b, nil)
		if got, err := js.Get(ctx, key, load); err != nil || got.ID != 42 || js.Stats().DecodeErrors != 1 {
			t.Fatalf("JSON cache over a msgpack entry: %+v, %v, decode errors %d", got, err, js.Stats().DecodeErrors)
		}
	})
}

// TestGetAfterWriteDoesNotJoinOlderLoad: a Get that starts after Invalidate
// or Set returned must not share an in-process load that read the row
// before the write.
func TestGetAfterWriteDoesNotJoinOlderLoad(t *testing.T) {
	for _, write := range []string{"invalidate", "set"} {
		t.Run(write, func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b *backend) {
				ctx := context.Background()
				c := newCache[int64](t, b, nil)
				key := b.key("row")
				var db atomic.Int64
				db.Store(1)
				inLoad, resume := make(chan struct{}), make(chan struct{})
				var first atomic.Bool
				load := func(context.Context) (int64, error) {
					row := db.Load()
					if first.CompareAndSwap(false, true) {
						close(inLoad)
						<-resume
					}
					return row, nil
				}
				oldDone := make(chan struct{})
				go func() { defer close(oldDone); _, _ = c.Get(ctx, key, load) }()
				<-inLoad
				db.Store(2)
				var err error
				if write == "set" {
					err = c.Set(ctx, key, 2)
				} else {
					_, err = c.Invalidate(ctx, key)
				}
				if err != nil {
					t.Fatal(err)
				}
				got := make(chan int64)
				go func() { v, _ := c.Get(ctx, key, load); got <- v }()
				select {
				case v := <-got: // answered without waiting for the old load
					if v != 2 {
						t.Fatalf("Get after %s = %d, want 2", write, v)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("Get after %s is waiting on the load that read the old row", write)
				}
				close(resume)
				<-oldDone
				if v, _ := c.Get(ctx, key, load); v != 2 {
					t.Fatalf("cache holds %d after the old load finished, want 2", v)
				}
			})
		})
	}
}

// TestPanicNeverCachedAsNotFound: a panic value wrapping ErrNotFound is
// still a panic.
func TestPanicNeverCachedAsNotFound(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{IsNotFound: func(error) bool { return true }})
		key := b.key("p")
		_, err := c.Get(context.Background(), key, func(context.Context) (string, error) {
			panic(fmt.Errorf("lookup: %w", ErrNotFound))
		})
		var pe *PanicError
		if !errors.As(err, &pe) {
			t.Fatalf("Get = %v (%T), want *PanicError", err, err)
		}
		if raw := b.raw(t, key); raw != nil {
			t.Fatalf("a panic left an entry: %q", raw)
		}
	})
}

// TestLoaderGoexit: a loader calling runtime.Goexit (t.FailNow does) gives
// its callers an error instead of hanging them, and releases the lease.
func TestLoaderGoexit(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("g")
		done := make(chan error, 1)
		go func() {
			_, err := c.Get(context.Background(), key, func(context.Context) (string, error) {
				runtime.Goexit()
				return "", nil
			})
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, errLoaderExited) {
				t.Fatalf("Get = %v, want errLoaderExited", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Get with a Goexit loader still blocked")
		}
		if raw := b.raw(t, key); raw != nil {
			t.Fatalf("lease left behind: %q", raw)
		}
	})
}

// TestLoaderIgnoringContext: a loader that never looks at its context is
// abandoned at LoadTimeout; callers get a deadline error, the lease is
// released, and Close does not wait for it.
func TestLoaderIgnoringContext(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{LoadTimeout: 50 * time.Millisecond})
		key := b.key("stuck")
		unblock := make(chan struct{})
		defer close(unblock)
		_, err := c.Get(context.Background(), key, func(context.Context) (string, error) {
			<-unblock
			return "late", nil
		})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Get = %v, want DeadlineExceeded", err)
		}
		if raw := b.raw(t, key); raw != nil {
			t.Fatalf("lease left behind: %q", raw)
		}
		if s := c.Stats(); s.LoadErrors != 1 {
			t.Fatalf("LoadErrors = %d", s.LoadErrors)
		}
	})
}

// TestDefaultLeaseIsShort: with the default LeaseTTL a lease lives 900ms
// in Redis, so waiters take over within a second of a holder's death; its
// live holder renews it (TestLeaseRenewedDuringLongLoad).
func TestDefaultLeaseIsShort(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.key("lease")
		release := make(chan struct{})
		loading := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = c.Get(context.Background(), key, func(context.Context) (string, error) {
				close(loading)
				<-release
				return "v", nil
			})
		}()
		<-loading
		pttl := b.client(t).PTTL(context.Background(), key).Val()
		close(release)
		<-done
		if pttl <= 0 || pttl > 900*time.Millisecond {
			t.Fatalf("the lease lives %v in Redis, want at most 900ms", pttl)
		}
	})
}
