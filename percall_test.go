package cacheaside

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// versioned is a source whose row changes behind the cache's back.
type versioned struct {
	v     atomic.Int64
	calls atomic.Int64
	fail  atomic.Bool
	gone  atomic.Bool
}

func (s *versioned) load(ctx context.Context) (string, error) {
	s.calls.Add(1)
	switch {
	case s.fail.Load():
		return "", errors.New("source down")
	case s.gone.Load():
		return "", ErrNotFound
	}
	return "v" + strconv.FormatInt(s.v.Load(), 10), nil
}

func (s *versioned) many(ctx context.Context, ids []int) (map[int]string, error) {
	s.calls.Add(1)
	m := make(map[int]string, len(ids))
	for _, id := range ids {
		m[id] = strconv.Itoa(id) + "v" + strconv.FormatInt(s.v.Load(), 10)
	}
	return m, nil
}

func mustGet(t *testing.T, c *Cache[string], key string, load Loader[string], want string, opts ...GetOptions) {
	t.Helper()
	got, err := c.Get(context.Background(), key, load, opts...)
	if err != nil || got != want {
		t.Fatalf("Get(%q, %+v) = %q, %v; want %q", key, opts, got, err, want)
	}
}

// Reload loads again what the cache holds (a value or a "not found"),
// fills it, and returns the loader's error rather than the old value.
func TestGetOptionsReload(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{Policy: Policy{TTL: time.Minute, StaleIfError: time.Hour}})
		key := b.key("reload")
		var src versioned
		mustGet(t, c, key, src.load, "v0")
		src.v.Store(1) // changed behind the cache's back
		mustGet(t, c, key, src.load, "v0")
		mustGet(t, c, key, src.load, "v1", GetOptions{Reload: true})
		mustGet(t, c, key, src.load, "v1")
		if n := src.calls.Load(); n != 2 {
			t.Fatalf("%d loads, want 2 (the miss and the reload)", n)
		}

		// A failed reload returns the loader's error, and the old value
		// stays cached.
		src.fail.Store(true)
		if _, err := c.Get(context.Background(), key, src.load, GetOptions{Reload: true}); err == nil || err.Error() != "source down" {
			t.Fatalf("Reload with the source down: %v, want its error", err)
		}
		mustGet(t, c, key, src.load, "v1")
		src.fail.Store(false)

		// A cached "not found" is reloaded too.
		gone := b.key("reload-gone")
		var g versioned
		g.gone.Store(true)
		if _, err := c.Get(context.Background(), gone, g.load); !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
		g.gone.Store(false)
		if _, err := c.Get(context.Background(), gone, g.load); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a cached not-found: %v", err)
		}
		mustGet(t, c, gone, g.load, "v0", GetOptions{Reload: true})
		mustGet(t, c, gone, g.load, "v0")
		if n := g.calls.Load(); n != 2 {
			t.Fatalf("%d loads of the absent row, want 2", n)
		}
	})
}

// Concurrent Reloads of one key in one process share one load.
func TestGetOptionsReloadShared(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{NoReadCoalescing: true})
		key := b.key("reload-shared")
		var src versioned
		mustGet(t, c, key, src.load, "v0")
		src.v.Store(1)
		gate := make(chan struct{})
		load := func(ctx context.Context) (string, error) {
			<-gate
			return src.load(ctx)
		}
		const n = 8
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for range n {
			wg.Go(func() {
				v, err := c.Get(context.Background(), key, load, GetOptions{Reload: true})
				if err == nil && v != "v1" {
					err = errors.New("got " + v)
				}
				if err != nil {
					errs <- err
				}
			})
		}
		waitFor(t, "the reloads to join one load", func() bool { return c.Stats().Coalesced == n-1 })
		close(gate)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if got := src.calls.Load(); got != 2 {
			t.Fatalf("%d loads, want 2 (the first fill, one shared reload)", got)
		}
	})
}

// NoStore serves hits but stores nothing it loads; with Reload it does not
// read the cache either.
func TestGetOptionsNoStore(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{})
		raw := b.client(t)
		key := b.key("nostore")
		var src versioned
		mustGet(t, c, key, src.load, "v0", GetOptions{NoStore: true})
		if err := raw.Get(ctx, key).Err(); !errors.Is(err, redis.Nil) {
			t.Fatalf("after a NoStore miss the key holds something (err %v)", err)
		}
		mustGet(t, c, key, src.load, "v0") // a plain Get fills it
		src.v.Store(1)
		mustGet(t, c, key, src.load, "v0", GetOptions{NoStore: true}) // a hit is served
		mustGet(t, c, key, src.load, "v1", GetOptions{NoStore: true, Reload: true})
		mustGet(t, c, key, src.load, "v0") // still cached as it was
		if n := src.calls.Load(); n != 3 {
			t.Fatalf("%d loads, want 3", n)
		}
		got, err := GetMany(ctx, c, []int{1, 2}, func(id int) string { return b.key("nostore-many:") + strconv.Itoa(id) }, src.many, GetOptions{NoStore: true})
		if err != nil || got[1] != "1v1" || got[2] != "2v1" {
			t.Fatalf("GetMany NoStore = %v, %v", got, err)
		}
		if n, err := raw.Exists(ctx, b.key("nostore-many:1"), b.key("nostore-many:2")).Result(); err != nil || n != 0 {
			t.Fatalf("after a NoStore GetMany %d keys exist (err %v)", n, err)
		}
	})
}

// TTL sets the fresh lifetime of what the call stores, and is checked.
func TestGetOptionsTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[string]{Clock: clock.Now, Policy: Policy{TTL: time.Hour, NoJitter: true}})
		raw := b.client(t)
		key := b.key("ttl")
		var src versioned
		mustGet(t, c, key, src.load, "v0", GetOptions{TTL: 10 * time.Second})
		bs, err := raw.Get(ctx, key).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		var e envelope.Entry
		if err := envelope.Decode(bs, &e); err != nil {
			t.Fatal(err)
		}
		if d := time.UnixMilli(e.SoftExpiry).Sub(clock.Now()); d < 9*time.Second || d > 10*time.Second {
			t.Fatalf("fresh for %v, want 10s", d)
		}
		src.v.Store(1)
		clock.Advance(11 * time.Second)
		mustGet(t, c, key, src.load, "v1") // past the call's TTL, though inside the Policy's

		ids := []int{1, 2}
		keyOf := func(id int) string { return b.key("ttl-many:") + strconv.Itoa(id) }
		if _, err := GetMany(ctx, c, ids, keyOf, src.many, GetOptions{TTL: 5 * time.Second}); err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if d := raw.PTTL(ctx, keyOf(id)).Val(); d <= 0 || d > 5*time.Second {
				t.Fatalf("GetMany with a TTL of 5s: key %d lives %v in Redis", id, d)
			}
		}

		for _, bad := range [][]GetOptions{
			{{TTL: -time.Second}},
			{{TTL: 2 * time.Hour}},
			{{TTL: time.Second, NoStore: true}},
			{{}, {}},
		} {
			if _, err := c.Get(ctx, key, src.load, bad...); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("Get with %+v: %v, want ErrInvalidOptions", bad, err)
			}
			if _, err := GetMany(ctx, c, ids, keyOf, src.many, bad...); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("GetMany with %+v: %v, want ErrInvalidOptions", bad, err)
			}
		}
	})
}

// SkipLocal reads Redis past the local tier and keeps nothing there; a
// Reload's fill drops the local tier's older copy.
func TestGetOptionsSkipLocal(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		key := b.key("skiplocal")
		var src versioned
		mustGet(t, c, key, src.load, "v0", GetOptions{SkipLocal: true}) // a miss, not kept locally
		mustGet(t, c, key, src.load, "v0")                              // a Redis hit, kept
		if s := c.Stats(); s.Hits != 1 || s.LocalHits != 0 {
			t.Fatalf("after the SkipLocal miss: %d hits, %d local; want the next Get to read Redis", s.Hits, s.LocalHits)
		}
		mustGet(t, c, key, src.load, "v0")
		mustGet(t, c, key, src.load, "v0", GetOptions{SkipLocal: true})
		if s := c.Stats(); s.Hits != 3 || s.LocalHits != 1 {
			t.Fatalf("%d hits, %d local; want 3 and 1 (the SkipLocal Get read Redis)", s.Hits, s.LocalHits)
		}
		src.v.Store(1)
		mustGet(t, c, key, src.load, "v0") // the local tier's copy
		mustGet(t, c, key, src.load, "v1", GetOptions{Reload: true})
		mustGet(t, c, key, src.load, "v1") // the older local copy is gone
	})
}

// GetOptions passed to a call cost no allocation: a local-tier hit, which
// allocates nothing, still allocates nothing with them. (The Redis-tier
// hit's count depends on the machine's timing, so it is compared in
// BenchmarkHitVsRaw, not here.)
func TestGetOptionsAllocs(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		key := b.key("allocs")
		load := func(context.Context) (string, error) { return "v", nil }
		mustGet(t, c, key, load, "v")
		mustGet(t, c, key, load, "v") // from the local tier from now on
		none := testing.AllocsPerRun(200, func() { _, _ = c.Get(ctx, key, load) })
		zero := testing.AllocsPerRun(200, func() { _, _ = c.Get(ctx, key, load, GetOptions{}) })
		ttl := testing.AllocsPerRun(200, func() { _, _ = c.Get(ctx, key, load, GetOptions{TTL: time.Minute}) })
		if none != 0 || zero != 0 || ttl != 0 {
			t.Fatalf("allocations per local hit: %.1f without options, %.1f with zero ones, %.1f with a TTL; want 0", none, zero, ttl)
		}
		if s := c.Stats(); s.LocalHits < 600 {
			t.Fatalf("%d local hits: the runs did not hit the local tier", s.LocalHits)
		}
	})
}

// A Reload that fills a new value tells the other processes' local tiers
// (the bus), before it returns; one whose value came back the same does
// not need to.
func TestGetOptionsReloadLocalTiers(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c1 := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		c2 := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
		key := b.key("reload-local")
		var src versioned
		mustGet(t, c1, key, src.load, "v0")
		mustGet(t, c2, key, src.load, "v0")
		mustGet(t, c2, key, src.load, "v0") // from c2's local tier
		before := c2.Stats().BusMessages
		mustGet(t, c1, key, src.load, "v0", GetOptions{Reload: true}) // unchanged: kept
		src.v.Store(1)
		mustGet(t, c1, key, src.load, "v1", GetOptions{Reload: true})
		waitFor(t, "c2's local tier to drop its copy", func() bool {
			v, err := c2.Get(ctx, key, src.load)
			return err == nil && v == "v1"
		})
		if n := c2.Stats().BusMessages - before; n != 1 {
			t.Fatalf("c2 applied %d bus messages, want 1 (the changed reload's)", n)
		}
		if s := c1.Stats(); s.Unchanged != 1 {
			t.Fatalf("c1: %d unchanged reloads, want 1", s.Unchanged)
		}
	})
}
