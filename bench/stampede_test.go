package bench

import (
	"context"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	rediscache "github.com/go-redis/cache/v9"
	"github.com/redis/go-redis/v9"
	"github.com/viccon/sturdyc"

	"github.com/seed-b4ec662f/cacheaside"
)

const (
	goroutines = 1000
	loaderTime = 50 * time.Millisecond
)

// redisFor returns a client on CACHEASIDE_REDIS_ADDR, or on a miniredis of
// the benchmark's own.
func redisFor(b *testing.B) *redis.Client {
	addr := os.Getenv("CACHEASIDE_REDIS_ADDR")
	if addr == "" {
		addr = miniredis.RunT(b).Addr()
	}
	rdb := redis.NewClient(cacheaside.Recommended(&redis.Options{Addr: addr}))
	b.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// stampede runs b.N stampedes: goroutines callers of get on one new key
// each, at once, with a loaderTime loader, and reports loads per stampede
// and the p50, p99 and max latency of all the calls. One stampede first,
// not counted, lets each client open its connections: otherwise the first
// stampede's thousand calls, 1/b.N of the samples, would make the p99 of
// the Redis clients a figure of their connection setup.
func stampede(b *testing.B, get func(ctx context.Context, key string, load func(context.Context) (string, error)) (string, error)) {
	var all []time.Duration
	var loads atomic.Int64
	load := func(context.Context) (string, error) {
		loads.Add(1)
		time.Sleep(loaderTime)
		return "v", nil
	}
	prefix := "bench:" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
	once := func(key string) []time.Duration {
		lat := make([]time.Duration, goroutines)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range goroutines {
			wg.Go(func() {
				<-start
				t0 := time.Now()
				if _, err := get(context.Background(), key, load); err != nil {
					b.Error(err)
				}
				lat[g] = time.Since(t0)
			})
		}
		close(start)
		wg.Wait()
		return lat
	}
	once(prefix + "warm")
	loads.Store(0)
	i := 0
	for b.Loop() {
		i++
		all = append(all, once(prefix+strconv.Itoa(i))...)
	}
	slices.Sort(all)
	pct := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))]) / 1e6 }
	b.ReportMetric(float64(loads.Load())/float64(b.N), "loads/stampede")
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(pct(1), "max-ms")
}

// BenchmarkInProcessStampede: 1,000 goroutines of one process on one cold
// key, loader 50ms. cacheaside and go-redis/cache go through Redis (a read,
// a lease or lock, a fill); sturdyc is in memory only.
func BenchmarkInProcessStampede(b *testing.B) {
	b.Run("cacheaside", func(b *testing.B) {
		c, err := cacheaside.New[string](redisFor(b), &cacheaside.Options[string]{Name: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = c.Close() })
		stampede(b, func(ctx context.Context, key string, load func(context.Context) (string, error)) (string, error) {
			return c.Get(ctx, key, load)
		})
	})
	b.Run("go-redis-cache", func(b *testing.B) {
		c := rediscache.New(&rediscache.Options{Redis: redisFor(b)})
		stampede(b, func(ctx context.Context, key string, load func(context.Context) (string, error)) (string, error) {
			var v string
			err := c.Once(&rediscache.Item{Ctx: ctx, Key: key, Value: &v, TTL: time.Minute,
				Do: func(it *rediscache.Item) (any, error) { return load(it.Ctx) }})
			return v, err
		})
	})
	b.Run("sturdyc", func(b *testing.B) {
		c := sturdyc.New[string](100_000, 10, time.Minute, 10)
		stampede(b, func(ctx context.Context, key string, load func(context.Context) (string, error)) (string, error) {
			return c.GetOrFetch(ctx, key, load)
		})
	})
}
