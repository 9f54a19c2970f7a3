package cacheaside

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// gatedRedis counts GET and MGET; GETs wait for gate while it is set, and
// MGETs wait for mgate while it is set (or for their ctx).
type gatedRedis struct {
	*redis.Client
	gets, mgets, mgetKeys atomic.Int64
	gate, mgate           chan struct{}
}

func (r *gatedRedis) Get(ctx context.Context, key string) *redis.StringCmd {
	r.gets.Add(1)
	if r.gate != nil {
		<-r.gate
	}
	return r.Client.Get(ctx, key)
}

func (r *gatedRedis) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	r.mgets.Add(1)
	r.mgetKeys.Add(int64(len(keys)))
	if r.mgate != nil {
		select {
		case <-r.mgate:
		case <-ctx.Done():
			cmd := redis.NewSliceCmd(ctx, "mget")
			cmd.SetErr(ctx.Err())
			return cmd
		}
	}
	return r.Client.MGet(ctx, keys...)
}

// While two reads are on the wire, further Gets are answered by one MGET
// of their keys, each with its own value.
func TestReadCoalescing(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &gatedRedis{Client: b.client(t)}
		c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 2 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		key := func(i int) string { return b.key(fmt.Sprint("k", i)) }
		for i := range 12 {
			if err := c.Set(ctx, key(i), fmt.Sprint("v", i)); err != nil {
				t.Fatal(err)
			}
		}
		fail := func(context.Context) (string, error) { return "", fmt.Errorf("loader called") }
		rdb.gate = make(chan struct{})
		var blocked sync.WaitGroup
		for i := range 2 { // two direct reads, held on the wire
			blocked.Go(func() {
				if v, err := c.Get(ctx, key(i), fail); err != nil || v != fmt.Sprint("v", i) {
					t.Errorf("direct Get %d = %q, %v", i, v, err)
				}
			})
		}
		waitFor(t, "two direct reads", func() bool { return rdb.gets.Load() == 2 })
		var queued sync.WaitGroup
		for i := 2; i < 12; i++ {
			queued.Go(func() {
				if v, err := c.Get(ctx, key(i), fail); err != nil || v != fmt.Sprint("v", i) {
					t.Errorf("queued Get %d = %q, %v", i, v, err)
				}
			})
		}
		queued.Wait() // answered while the direct reads are still held
		if g, m, k := rdb.gets.Load(), rdb.mgets.Load(), rdb.mgetKeys.Load(); g != 2 || m < 1 || m > 10 || k != 10 {
			t.Fatalf("%d GETs, %d MGETs of %d keys in all; want the 10 queued reads in a few MGETs", g, m, k)
		}
		close(rdb.gate)
		blocked.Wait()
		if s := c.Stats(); s.Hits != 12 || s.Misses != 0 {
			t.Fatalf("stats %+v", s)
		}
	})
}

// A queued read waits at most twice the operation budget; then the Get
// answers from the loader, as for any failed read.
func TestReadCoalescingBudget(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	ctx := context.Background()
	rdb := &gatedRedis{Client: b.client(t), gate: make(chan struct{}), mgate: make(chan struct{})}
	c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 50 * time.Millisecond, NoBreaker: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var held sync.WaitGroup
	for i := range 2 {
		held.Go(func() {
			_, _ = c.Get(ctx, b.key(fmt.Sprint("held", i)), func(context.Context) (string, error) { return "x", nil })
		})
	}
	waitFor(t, "two direct reads", func() bool { return rdb.gets.Load() == 2 })
	start := time.Now()
	v, err := c.Get(ctx, b.key("queued"), func(context.Context) (string, error) { return "from the loader", nil })
	took := time.Since(start)
	if err != nil || v != "from the loader" {
		t.Fatalf("queued Get = %q, %v", v, err)
	}
	if s := c.Stats(); s.RedisErrors == 0 {
		t.Fatalf("stats %+v: the spent budget was not counted as a Redis failure", s)
	}
	t.Logf("queued Get answered from the loader after %v (budget 50ms, queued reads wait at most 2x)", took)
	close(rdb.gate)
	close(rdb.mgate)
	held.Wait()
}

func TestNoReadCoalescing(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	ctx := context.Background()
	rdb := &gatedRedis{Client: b.client(t)}
	c, err := New[string](rdb, &Options[string]{NoReadCoalescing: true, Degradation: Degradation{OpTimeout: 2 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Go(func() {
			_, _ = c.Get(ctx, b.key(fmt.Sprint(i%8)), func(context.Context) (string, error) { return "v", nil })
		})
	}
	wg.Wait()
	if m := rdb.mgets.Load(); m != 0 {
		t.Fatalf("%d MGETs with NoReadCoalescing", m)
	}
}

// TestCoalescedBatchCountsDistinctKeys: a batch is bounded by its distinct
// keys, so 1,000 queued reads of one key go out as one MGET of that key
// (they went out as four, of 256 reads each, when the bound counted reads).
func TestCoalescedBatchCountsDistinctKeys(t *testing.T) {
	q := newCoalescer()
	var reads, keys atomic.Int64
	const n = 1000
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if _, err := q.wait(context.Background(), time.Minute, "k"); err != nil {
				t.Error(err)
			}
		})
	}
	waitFor(t, "every read queued", func() bool { q.mu.Lock(); defer q.mu.Unlock(); return len(q.queue) == n })
	stop, cancel := context.WithCancel(context.Background())
	defer cancel()
	go q.run(stop, func(_ context.Context, ks []string) ([][]byte, []error) {
		reads.Add(1)
		keys.Add(int64(len(ks)))
		return make([][]byte, len(ks)), make([]error, len(ks))
	})
	wg.Wait()
	if reads.Load() != 1 || keys.Load() != 1 {
		t.Fatalf("%d reads of %d keys for %d queued reads of one key; want one read of one key", reads.Load(), keys.Load(), n)
	}
}
