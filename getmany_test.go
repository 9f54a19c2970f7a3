package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// batchCounter is a BatchLoader that counts its calls and the ids it was
// asked for. Ids in absent are left out of its result; ids at or above
// missingFrom too.
type batchCounter struct {
	mu     sync.Mutex
	calls  int
	asked  [][]int
	absent map[int]bool
	gate   chan struct{} // when set, each call waits for it
	err    error
	panic  bool
}

func (b *batchCounter) load(ctx context.Context, ids []int) (map[int]string, error) {
	b.mu.Lock()
	b.calls++
	b.asked = append(b.asked, slices.Sorted(slices.Values(ids)))
	gate, err, p := b.gate, b.err, b.panic
	b.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if p {
		panic("batch loader broke")
	}
	if err != nil {
		return nil, err
	}
	m := make(map[int]string, len(ids))
	for _, id := range ids {
		if !b.absent[id] {
			m[id] = fmt.Sprintf("v%d", id)
		}
	}
	return m, nil
}

func (b *batchCounter) stats() (int, [][]int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls, slices.Clone(b.asked)
}

func ids(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

func TestGetManyHitsMissesAndTombstones(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		key := func(id int) string { return b.key(fmt.Sprintf("item:%d", id)) }
		// 0..3 cached by single Gets; 8 and 9 do not exist.
		for _, id := range []int{0, 1, 2, 3} {
			if _, err := c.Get(ctx, key(id), func(context.Context) (string, error) { return fmt.Sprintf("v%d", id), nil }); err != nil {
				t.Fatal(err)
			}
		}
		bl := &batchCounter{absent: map[int]bool{8: true, 9: true}}
		got, err := GetMany(ctx, c, ids(10), key, bl.load)
		if err != nil {
			t.Fatalf("GetMany: %v", err)
		}
		if len(got) != 8 {
			t.Fatalf("got %d values, want 8: %v", len(got), got)
		}
		for id := range 8 {
			if got[id] != fmt.Sprintf("v%d", id) {
				t.Fatalf("id %d = %q", id, got[id])
			}
		}
		calls, asked := bl.stats()
		if calls != 1 || !slices.Equal(asked[0], []int{4, 5, 6, 7, 8, 9}) {
			t.Fatalf("loader calls %d asked %v, want one call for the 6 misses", calls, asked)
		}
		// Everything is cached now, the absent ids as tombstones.
		got, err = GetMany(ctx, c, append(ids(10), 3, 3), key, bl.load)
		if err != nil || len(got) != 8 {
			t.Fatalf("second GetMany: %d values, %v", len(got), err)
		}
		if calls, _ := bl.stats(); calls != 1 {
			t.Fatalf("second GetMany called the loader (%d calls)", calls)
		}
		if _, err := c.Get(ctx, key(9), func(context.Context) (string, error) { t.Fatal("loader called"); return "", nil }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get of an omitted id: %v, want ErrNotFound", err)
		}
		s := c.Stats()
		if s.Hits != 4+8 || s.NegativeHits != 2+1 || s.Misses != 4+6 {
			t.Fatalf("stats %+v", s)
		}
	})
}

func TestGetManyPartialFailure(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		key := func(id int) string { return b.key(fmt.Sprintf("item:%d", id)) }
		if _, err := GetMany(ctx, c, []int{0, 1}, key, (&batchCounter{}).load); err != nil {
			t.Fatal(err)
		}
		boom := errors.New("db down")
		bl := &batchCounter{err: boom}
		badKey := func(id int) string {
			if id == 5 {
				return ""
			}
			return key(id)
		}
		got, err := GetMany(ctx, c, ids(6), badKey, bl.load)
		if len(got) != 2 || got[0] != "v0" || got[1] != "v1" {
			t.Fatalf("partial result %v, want the two hits", got)
		}
		if !errors.Is(err, boom) || !errors.Is(err, ErrInvalidKey) {
			t.Fatalf("err %v, want the loader's error and ErrInvalidKey", err)
		}
		var ke *KeyError
		if !errors.As(err, &ke) {
			t.Fatalf("err %v holds no *KeyError", err)
		}
		n := 0
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			if errors.As(e, &ke) && errors.Is(e, boom) {
				n++
			}
		}
		if n != 3 {
			t.Fatalf("%d keys failed with the loader's error, want 3 (ids 2-4): %v", n, err)
		}
		// Nothing was cached for the failed ids: the next batch loads them.
		bl2 := &batchCounter{}
		if got, err := GetMany(ctx, c, ids(5), key, bl2.load); err != nil || len(got) != 5 {
			t.Fatalf("after the failure: %v %v", got, err)
		}
		if _, asked := bl2.stats(); len(asked) != 1 || !slices.Equal(asked[0], []int{2, 3, 4}) {
			t.Fatalf("asked %v, want [[2 3 4]]", asked)
		}
	})
}

func TestGetManyLoaderPanicAndNilArguments(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	c := newCache[string](t, b, nil)
	key := func(id int) string { return b.key(fmt.Sprint(id)) }
	_, err := GetMany(context.Background(), c, ids(3), key, (&batchCounter{panic: true}).load)
	var pe *PanicError
	if !errors.As(err, &pe) || !errors.Is(err, ErrLoaderPanic) {
		t.Fatalf("err %v, want a *PanicError", err)
	}
	if mr.Exists(key(0)) {
		t.Fatal("a lease or value survived the panic")
	}
	if _, err := GetMany[int, string](context.Background(), c, ids(3), key, nil); err == nil {
		t.Fatal("nil loader accepted")
	}
	if _, err := GetMany(context.Background(), nil, ids(3), key, (&batchCounter{}).load); err == nil {
		t.Fatal("nil cache accepted")
	}
}

// A batch and single Gets of the same keys share one load per key, in
// both directions.
func TestGetManySharesLoadsWithGet(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache[string](t, b, nil)
		key := func(id int) string { return b.key(fmt.Sprintf("item:%d", id)) }

		// A single Get is loading id 0; a batch of 0..3 joins it.
		release := make(chan struct{})
		var single atomic.Int64
		getDone := make(chan error, 1)
		go func() {
			_, err := c.Get(ctx, key(0), func(context.Context) (string, error) {
				single.Add(1)
				<-release
				return "v0", nil
			})
			getDone <- err
		}()
		waitFor(t, "the single load", func() bool { return single.Load() == 1 })
		bl := &batchCounter{}
		batchDone := make(chan map[int]string, 1)
		go func() {
			got, err := GetMany(ctx, c, ids(4), key, bl.load)
			if err != nil {
				t.Error(err)
			}
			batchDone <- got
		}()
		waitFor(t, "the batch load", func() bool { n, _ := bl.stats(); return n == 1 })
		close(release)
		got := <-batchDone
		if err := <-getDone; err != nil {
			t.Fatal(err)
		}
		if len(got) != 4 || got[0] != "v0" {
			t.Fatalf("batch got %v", got)
		}
		if _, asked := bl.stats(); !slices.Equal(asked[0], []int{1, 2, 3}) {
			t.Fatalf("batch loader asked for %v, want [1 2 3] (0 was being loaded)", asked[0])
		}

		// A batch is loading 10..13; single Gets of 10 and 12 join it.
		bl = &batchCounter{gate: make(chan struct{})}
		go func() {
			got, err := GetMany(ctx, c, []int{10, 11, 12, 13}, key, bl.load)
			if err != nil || len(got) != 4 {
				t.Errorf("batch: %v %v", got, err)
			}
			batchDone <- got
		}()
		waitFor(t, "the batch load", func() bool { n, _ := bl.stats(); return n == 1 })
		var joins atomic.Int64
		c.hooks = &testHooks{joined: func(string) { joins.Add(1) }}
		var wg sync.WaitGroup
		for _, id := range []int{10, 12} {
			wg.Go(func() {
				v, err := c.Get(ctx, key(id), func(context.Context) (string, error) {
					single.Add(1)
					return "single", nil
				})
				if err != nil || v != fmt.Sprintf("v%d", id) {
					t.Errorf("Get %d = %q, %v", id, v, err)
				}
			})
		}
		waitFor(t, "the Gets to join the batch's flights", func() bool { return joins.Load() == 2 })
		close(bl.gate)
		wg.Wait()
		<-batchDone
		if single.Load() != 1 {
			t.Fatalf("single loaders ran %d times, want only the first", single.Load())
		}
	})
}

// Two processes: one batch holds the leases, the other's batch waits for
// its fills instead of loading the same ids.
func TestGetManyAcrossInstances(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c1 := newCache[string](t, b, nil)
		c2 := newCache[string](t, b, nil)
		key := func(id int) string { return b.key(fmt.Sprintf("item:%d", id)) }
		bl1 := &batchCounter{gate: make(chan struct{}), absent: map[int]bool{3: true}}
		done := make(chan struct{})
		go func() {
			defer close(done)
			if _, err := GetMany(ctx, c1, ids(4), key, bl1.load); err != nil {
				t.Error(err)
			}
		}()
		waitFor(t, "the first batch", func() bool { n, _ := bl1.stats(); return n == 1 })
		bl2 := &batchCounter{}
		res := make(chan map[int]string, 1)
		go func() {
			got, err := GetMany(ctx, c2, ids(6), key, bl2.load)
			if err != nil {
				t.Error(err)
			}
			res <- got
		}()
		waitFor(t, "the second batch", func() bool { n, _ := bl2.stats(); return n == 1 })
		waitFor(t, "the second batch to wait for the first's leases", func() bool { return c2.Stats().LeaseContended == 4 })
		close(bl1.gate)
		got := <-res
		<-done
		if len(got) != 5 || got[0] != "v0" || got[5] != "v5" {
			t.Fatalf("second batch got %v, want ids 0-2 and 4-5", got)
		}
		if _, asked := bl2.stats(); len(asked) != 1 || !slices.Equal(asked[0], []int{4, 5}) {
			t.Fatalf("second loader asked %v, want only [4 5]", asked)
		}
	})
}

// A namespaced cache reads the generation with the entries, and a bump
// turns every entry of the namespace into a miss.
func TestGetManyNamespaced(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Namespaced: true})
		ks := MustKeyspace("items", 1)
		ns := ks.Namespace(b.prefix+"org", "acme")
		other := ks.Namespace(b.prefix+"org", "zeta")
		key := func(id int) string {
			if id%2 == 1 {
				return other.Key("item", fmt.Sprint(id))
			}
			return ns.Key("item", fmt.Sprint(id))
		}
		bl := &batchCounter{}
		for range 2 {
			if got, err := GetMany(ctx, c, ids(6), key, bl.load); err != nil || len(got) != 6 {
				t.Fatalf("GetMany: %v %v", got, err)
			}
		}
		if err := c.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		if got, err := GetMany(ctx, c, ids(6), key, bl.load); err != nil || len(got) != 6 {
			t.Fatalf("GetMany: %v %v", got, err)
		}
		calls, asked := bl.stats()
		if calls != 2 || !slices.Equal(asked[1], []int{0, 2, 4}) {
			t.Fatalf("calls %d asked %v, want a second call for the bumped namespace only", calls, asked)
		}
	})
}

// Past its TTL, inside StaleIfError, a failed batch reload serves the old
// values; inside StaleWhileRevalidate the old values come at once and one
// background refresh per key follows.
func TestGetManyStaleWindows(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	clk := newFakeClock()
	c := newCache(t, b, &Options[string]{Clock: clk.Now, Policy: Policy{TTL: time.Minute, NoJitter: true, NoEarlyRefresh: true,
		StaleWhileRevalidate: time.Minute, StaleIfError: time.Hour}})
	key := func(id int) string { return b.key(fmt.Sprint(id)) }
	ctx := context.Background()
	if _, err := GetMany(ctx, c, ids(3), key, (&batchCounter{}).load); err != nil {
		t.Fatal(err)
	}
	clk.Advance(90 * time.Second) // stale: served, refreshed in the background
	bl := &batchCounter{}
	got, err := GetMany(ctx, c, ids(3), key, bl.load)
	if err != nil || len(got) != 3 {
		t.Fatalf("stale GetMany: %v %v", got, err)
	}
	waitFor(t, "three background refreshes", func() bool { n, _ := bl.stats(); return n == 3 })
	waitFor(t, "the refreshes to end", func() bool { return c.Stats().Refreshes == 3 })

	clk.Advance(5 * time.Minute) // past the stale window: reload now, old value if it fails
	boom := errors.New("db down")
	got, err = GetMany(ctx, c, ids(4), key, (&batchCounter{err: boom}).load)
	if len(got) != 3 || got[2] != "v2" {
		t.Fatalf("stale-if-error: got %v", got)
	}
	if !errors.Is(err, boom) || errors.Is(err, ErrNotFound) {
		t.Fatalf("err %v, want only id 3's loader error", err)
	}
	// The values are still there to serve after the failed reload.
	got, err = GetMany(ctx, c, ids(3), key, (&batchCounter{err: boom}).load)
	if len(got) != 3 {
		t.Fatalf("second stale-if-error: got %v, %v", got, err)
	}
}

// With Redis gone, FailOpen loads every id (one call, nothing cached) and
// FailClosed fails every key with ErrRedisUnavailable.
func TestGetManyRedisDown(t *testing.T) {
	ctx := context.Background()
	for _, policy := range []RedisDownPolicy{FailOpen, FailClosed} {
		t.Run(policy.String(), func(t *testing.T) {
			rdb := redis.NewClient(&redis.Options{Addr: closedAddr(t), MaxRetries: -1, ContextTimeoutEnabled: true})
			defer rdb.Close()
			c, err := New(rdb, &Options[string]{Logger: slog.New(slog.DiscardHandler), Degradation: Degradation{OnRedisDown: policy}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			bl := &batchCounter{absent: map[int]bool{2: true}}
			got, err := GetMany(ctx, c, ids(4), func(id int) string { return fmt.Sprint("k", id) }, bl.load)
			calls, _ := bl.stats()
			if policy == FailOpen {
				if err != nil || len(got) != 3 || calls != 1 {
					t.Fatalf("fail-open: %v %v, %d loader calls", got, err, calls)
				}
				return
			}
			if !errors.Is(err, ErrRedisUnavailable) || len(got) != 0 || calls != 0 {
				t.Fatalf("fail-closed: %v %v, %d loader calls", got, err, calls)
			}
		})
	}
}

// A caller whose ctx ends gets what it has and ctx's error per missing
// key; the shared load goes on and fills the cache.
func TestGetManyCallerCancels(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	c := newCache[string](t, b, nil)
	key := func(id int) string { return b.key(fmt.Sprint(id)) }
	if _, err := GetMany(context.Background(), c, []int{0}, key, (&batchCounter{}).load); err != nil {
		t.Fatal(err)
	}
	bl := &batchCounter{gate: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	got, err := GetMany(ctx, c, ids(3), key, bl.load)
	if len(got) != 1 || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, %v", got, err)
	}
	close(bl.gate)
	waitFor(t, "the fill", func() bool { return mr.Exists(key(2)) && len(b.raw(t, key(2))) > 40 })
}
