package cachetest_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/cachetest"
)

// The package doc's scenario: the Clock expires the entry in the cache and
// in Redis together.
func TestClockMovesCacheAndRedis(t *testing.T) {
	rdb, mr := cachetest.Redis(t)
	clock := cachetest.NewClock(mr)
	c := cachetest.New(t, rdb, &cacheaside.Options[string]{Policy: cacheaside.Policy{TTL: time.Minute}, Clock: clock.Now})
	ctx := context.Background()
	load := cachetest.Value("v")
	for range 2 {
		if v, err := c.Get(ctx, "k", load.Loader); err != nil || v != "v" {
			t.Fatalf("Get: %q %v", v, err)
		}
	}
	if load.Calls() != 1 {
		t.Fatalf("%d loads, want 1", load.Calls())
	}
	if ttl := mr.TTL("k"); ttl <= 0 || ttl > 2*time.Minute {
		t.Fatalf("Redis TTL %v", ttl)
	}
	clock.Advance(10 * time.Minute)
	if mr.Exists("k") {
		t.Fatal("the entry outlived the clock in Redis")
	}
	if _, err := c.Get(ctx, "k", load.Loader); err != nil || load.Calls() != 2 {
		t.Fatalf("after the TTL: %v, %d loads", err, load.Calls())
	}
	// Without a server, a Clock is the cache's alone.
	alone := cachetest.NewClock(nil)
	t0 := alone.Now()
	alone.Advance(time.Hour)
	if alone.Now().Sub(t0) != time.Hour {
		t.Fatal("Advance")
	}
}

// The soft expiry follows the Clock too: inside the Redis TTL, an entry
// past its soft expiry is reloaded.
func TestClockSoftExpiry(t *testing.T) {
	rdb, mr := cachetest.Redis(t)
	clock := cachetest.NewClock(mr)
	c := cachetest.New(t, rdb, &cacheaside.Options[string]{Clock: clock.Now,
		Policy: cacheaside.Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour}})
	ctx := context.Background()
	load := cachetest.Value("v")
	_, _ = c.Get(ctx, "k", load.Loader)
	clock.Advance(2 * time.Minute)
	if !mr.Exists("k") {
		t.Fatal("the stale window keeps the entry in Redis")
	}
	if _, err := c.Get(ctx, "k", load.Loader); err != nil {
		t.Fatal(err)
	}
	if c.Stats().StaleServed != 1 {
		t.Fatalf("stats %+v: want the stale value served", c.Stats())
	}
}

// WaitLocal makes local hits deterministic right after New.
func TestWaitLocal(t *testing.T) {
	rdb, _ := cachetest.Redis(t)
	clock := cachetest.NewClock(nil)
	c := cachetest.New(t, rdb, &cacheaside.Options[string]{Local: &cacheaside.LocalOptions{TTL: time.Second}, Clock: clock.Now})
	cachetest.WaitLocal(t, c)
	ctx := context.Background()
	load := cachetest.Value("v")
	for range 3 {
		_, _ = c.Get(ctx, "k", load.Loader)
	}
	if s := c.Stats(); s.LocalHits != 2 || load.Calls() != 1 {
		t.Fatalf("stats %+v, %d loads: want 2 local hits", s, load.Calls())
	}
	clock.Advance(2 * time.Second) // past the local TTL: Redis answers
	_, _ = c.Get(ctx, "k", load.Loader)
	if s := c.Stats(); s.LocalHits != 2 || s.Hits != 3 {
		t.Fatalf("stats %+v: want a Redis hit after the local TTL", s)
	}
}

func TestCounters(t *testing.T) {
	rdb, _ := cachetest.Redis(t)
	c := cachetest.New[string](t, rdb, nil)
	ctx := context.Background()
	nf := cachetest.NotFound[string]()
	for range 3 {
		if _, err := c.Get(ctx, "gone", nf.Loader); !errors.Is(err, cacheaside.ErrNotFound) {
			t.Fatal(err)
		}
	}
	if nf.Calls() != 1 {
		t.Fatalf("%d loads of a missing item, want 1 (negative caching)", nf.Calls())
	}
	batch := cachetest.CountBatch(func(_ context.Context, ids []int) (map[int]string, error) {
		m := map[int]string{}
		for _, id := range ids {
			m[id] = fmt.Sprint("v", id)
		}
		return m, nil
	})
	key := func(id int) string { return fmt.Sprint("item:", id) }
	for _, ids := range [][]int{{1, 2}, {2, 3}} {
		if _, err := cacheaside.GetMany(ctx, c, ids, key, batch.Loader); err != nil {
			t.Fatal(err)
		}
	}
	asked := batch.Asked()
	slices.Sort(asked[0])
	if batch.Calls() != 2 || !slices.Equal(asked[0], []int{1, 2}) || !slices.Equal(asked[1], []int{3}) {
		t.Fatalf("batch calls %v", asked)
	}
}

// fakeT records a failure instead of ending a goroutine.
type fakeT struct {
	failed   string
	cleanups []func()
}

func (f *fakeT) Helper()                           {}
func (f *fakeT) Cleanup(fn func())                 { f.cleanups = append(f.cleanups, fn) }
func (f *fakeT) Fatalf(format string, args ...any) { f.failed = fmt.Sprintf(format, args...) }

// New reports a bad option as a test failure.
func TestNewFailsTheTest(t *testing.T) {
	rdb, _ := cachetest.Redis(t)
	f := &fakeT{}
	cachetest.New(f, rdb, &cacheaside.Options[string]{Name: "bad name with spaces\n"})
	if f.failed == "" {
		cachetest.New(f, rdb, &cacheaside.Options[string]{LoadTimeout: -1})
	}
	if f.failed == "" {
		t.Fatal("invalid options did not fail the test")
	}
}
