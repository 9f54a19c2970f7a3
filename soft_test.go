package cacheaside

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// softPolicy keeps a value a minute, and an hour more to be served if its
// reload fails or runs past the soft load timeout.
var softPolicy = Policy{TTL: time.Minute, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}

// gatedSource is a row whose reloads block until the test lets them
// return.
type gatedSource struct {
	v       atomic.Int64
	loads   atomic.Int64
	entered chan struct{} // receives once per load that blocks
	gate    chan struct{} // closed: loads return
}

func newGatedSource(v int64) *gatedSource {
	s := &gatedSource{entered: make(chan struct{}, 16), gate: make(chan struct{})}
	s.v.Store(v)
	return s
}

func (s *gatedSource) load(ctx context.Context) (int64, error) {
	s.loads.Add(1)
	v := s.v.Load()
	select {
	case s.entered <- struct{}{}:
	default:
	}
	select {
	case <-s.gate:
		return v, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// TestSoftLoadTimeout: a value past its TTL, inside StaleIfError, whose
// reload blocks. Every Get, the leader's, those that joined its load in
// this process, and another process's that waits for its lease, returns
// the old value once the soft load timeout has passed; the reload goes on,
// fills the entry, and the next Gets read the new value without a load.
func TestSoftLoadTimeout(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		opts := func() *Options[int64] {
			return &Options[int64]{Policy: softPolicy, Clock: clock.Now, SoftLoadTimeout: 100 * time.Millisecond, LoadTimeout: time.Minute}
		}
		c, other := newCache(t, b, opts()), newCache(t, b, opts())
		key := b.key("soft")
		src := newGatedSource(1)
		close(src.gate)
		if v, err := c.Get(ctx, key, src.load); v != 1 || err != nil {
			t.Fatalf("first Get = %d, %v", v, err)
		}
		src.gate = make(chan struct{})
		src.v.Store(2)
		clock.Advance(2 * time.Minute) // past the TTL, inside StaleIfError

		const n = 20
		var wg sync.WaitGroup
		got := make([]int64, n+1)
		errs := make([]error, n+1)
		wg.Go(func() { got[0], errs[0] = c.Get(ctx, key, src.load) })
		<-src.entered // the reload holds the lease
		for i := 1; i < n; i++ {
			wg.Go(func() { got[i], errs[i] = c.Get(ctx, key, src.load) })
		}
		wg.Go(func() { got[n], errs[n] = other.Get(ctx, key, src.load) }) // waits for c's lease
		wg.Wait()
		for i := range got {
			if got[i] != 1 || errs[i] != nil {
				t.Fatalf("Get %d during the slow reload = %d, %v; want the old 1", i, got[i], errs[i])
			}
		}
		if s := c.Stats().SoftTimeouts; s != 1 {
			t.Errorf("the loading process's SoftTimeouts = %d, want 1 (one flight)", s)
		}
		if s := other.Stats().SoftTimeouts; s != 1 {
			t.Errorf("the waiting process's SoftTimeouts = %d, want 1", s)
		}
		if l := src.loads.Load(); l != 2 {
			t.Fatalf("%d loads, want 2 (the first fill and one reload)", l)
		}

		close(src.gate) // the reload returns and fills
		waitFor(t, "the reload's fill", func() bool {
			var e envelope.Entry
			raw := b.raw(t, key)
			return raw != nil && envelope.Decode(raw, &e) == nil && e.Kind == envelope.Value
		})
		for _, cc := range []*Cache[int64]{c, other} {
			if v, err := cc.Get(ctx, key, src.load); v != 2 || err != nil {
				t.Fatalf("Get after the reload = %d, %v; want 2", v, err)
			}
		}
		if l := src.loads.Load(); l != 2 {
			t.Fatalf("%d loads after the fill, want still 2", l)
		}
	})
}

// TestSoftLoadTimeoutNeedsAnOldValue: without a value inside StaleIfError
// (a cold key) the soft load timeout does nothing: Gets wait for the load.
func TestSoftLoadTimeoutNeedsAnOldValue(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[int64]{Policy: softPolicy, SoftLoadTimeout: 10 * time.Millisecond, LoadTimeout: time.Minute})
		src := newGatedSource(7)
		done := make(chan int64, 1)
		go func() { v, _ := c.Get(ctx, b.key("cold"), src.load); done <- v }()
		<-src.entered
		time.Sleep(50 * time.Millisecond) // five soft timeouts
		select {
		case v := <-done:
			t.Fatalf("a cold Get returned %d before its load", v)
		default:
		}
		close(src.gate)
		if v := <-done; v != 7 {
			t.Fatalf("cold Get = %d, want 7", v)
		}
		if s := c.Stats().SoftTimeouts; s != 0 {
			t.Fatalf("SoftTimeouts = %d on a cold key", s)
		}
	})
}

func TestSoftLoadTimeoutOptions(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: miniredisRun(t).Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	for _, o := range []Options[int64]{
		{SoftLoadTimeout: -time.Millisecond},
		{SoftLoadTimeout: 5 * time.Second}, // the default LoadTimeout
		{SoftLoadTimeout: time.Second, LoadTimeout: 500 * time.Millisecond},
	} {
		if _, err := New[int64](rdb, &o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("New with SoftLoadTimeout %v, LoadTimeout %v: %v, want ErrInvalidOptions", o.SoftLoadTimeout, o.LoadTimeout, err)
		}
	}
}

// TestSoftLoadTimeoutAfterInvalidation: a Get that begins after another
// process's invalidation returned joins the reload still running here, but
// does not take its old value at the soft load timeout: it waits for the
// reload, whose fill is refused, and loads the new value.
func TestSoftLoadTimeoutAfterInvalidation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		opts := &Options[int64]{Policy: softPolicy, Clock: clock.Now, SoftLoadTimeout: 20 * time.Millisecond, LoadTimeout: time.Minute}
		c := newCache(t, b, opts)
		other := newCache(t, b, &Options[int64]{Policy: softPolicy, Clock: clock.Now})
		key := b.key("soft")
		src := newGatedSource(1)
		close(src.gate)
		if v, err := c.Get(ctx, key, src.load); v != 1 || err != nil {
			t.Fatalf("first Get = %d, %v", v, err)
		}
		gate := make(chan struct{})
		src.gate = gate
		t.Cleanup(func() {
			select {
			case <-gate:
			default:
				close(gate)
			}
		})
		clock.Advance(2 * time.Minute)
		if v, err := c.Get(ctx, key, src.load); v != 1 || err != nil { // the soft timeout: the old value, the reload goes on
			t.Fatalf("Get at the soft timeout = %d, %v; want the old 1", v, err)
		}
		<-src.entered
		src.v.Store(2)
		if _, err := other.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		late := make(chan int64, 1)
		go func() { v, _ := c.Get(ctx, key, src.load); late <- v }()
		time.Sleep(100 * time.Millisecond) // five soft timeouts
		select {
		case v := <-late:
			t.Fatalf("a Get begun after the invalidation returned %d while the reload ran", v)
		default:
		}
		close(gate)
		if v := <-late; v != 2 {
			t.Fatalf("a Get begun after the invalidation = %d, want 2", v)
		}
	})
}

// TestSoftLoadTimeoutGetMany: GetMany's keys get the same: the old values
// at the soft load timeout, one reload of each going on to fill them.
func TestSoftLoadTimeoutGetMany(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[int64]{Policy: softPolicy, Clock: clock.Now, SoftLoadTimeout: 20 * time.Millisecond, LoadTimeout: time.Minute})
		key := func(id int) string { return b.key("many:") + string(rune('a'+id)) }
		var version atomic.Int64
		version.Store(1)
		var calls atomic.Int64
		var mu sync.Mutex
		loads := map[int]int{} // loads of each id
		gate := make(chan struct{})
		load := func(ctx context.Context, ids []int) (map[int]int64, error) {
			v := version.Load()
			mu.Lock()
			for _, id := range ids {
				loads[id]++
			}
			mu.Unlock()
			if calls.Add(1) > 1 {
				<-gate
			}
			m := make(map[int]int64, len(ids))
			for _, id := range ids {
				m[id] = v*10 + int64(id)
			}
			return m, nil
		}
		ids := []int{0, 1, 2}
		if _, err := GetMany(ctx, c, ids, key, load); err != nil {
			t.Fatal(err)
		}
		version.Store(2)
		clock.Advance(2 * time.Minute)
		got, err := GetMany(ctx, c, ids, key, load)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if got[id] != 10+int64(id) {
				t.Fatalf("GetMany at the soft timeout: %v, want the old values", got)
			}
		}
		if s := c.Stats().SoftTimeouts; s != 3 {
			t.Fatalf("SoftTimeouts = %d, want 3 (one per key)", s)
		}
		close(gate)
		waitFor(t, "the batch reload's fills", func() bool {
			m, err := GetMany(ctx, c, ids, key, load)
			return err == nil && m[2] == 22
		})
		// One reload of each id (usually in one batch call; a lease round
		// whose reply this process read late, on a busy machine, is sent
		// again, and its keys loaded in a call of their own).
		mu.Lock()
		defer mu.Unlock()
		for _, id := range ids {
			if loads[id] != 2 {
				t.Fatalf("id %d loaded %d times, want 2 (the fill and one reload); %d batch calls", id, loads[id], calls.Load())
			}
		}
	})
}
