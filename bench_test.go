package cacheaside

import (
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// benchTask is the value the hit benchmarks read: a task row as the
// reference app caches it.
type benchTask struct {
	ID       int64     `json:"id"`
	Title    string    `json:"title"`
	Assignee string    `json:"assignee"`
	Org      string    `json:"org"`
	Status   string    `json:"status"`
	Tags     []string  `json:"tags"`
	Updated  time.Time `json:"updated"`
}

var benchValue = benchTask{
	ID: 42, Title: "Design caching layer", Assignee: "Alice", Org: "Acme Corp", Status: "doing",
	Tags: []string{"backend", "performance"}, Updated: time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC),
}

// benchRedis returns a client on $CACHEASIDE_REDIS_ADDR, or on a miniredis
// when it is unset (useful only to check the benchmarks run: the figures in
// the README come from a real Redis).
func benchRedis(b *testing.B) *redis.Client {
	b.Helper()
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		mr := miniredis.RunT(b)
		addr = mr.Addr()
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	b.Cleanup(func() { _ = rdb.Close() })
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		b.Fatalf("Redis at %s: %v", addr, err)
	}
	return rdb
}

// BenchmarkRawGet is the baseline: go-redis GET and json.Unmarshal of the
// same struct, with no cache logic at all.
func BenchmarkRawGet(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	key := uniquePrefix() + "raw"
	payload, _ := json.Marshal(benchValue)
	rdb.Set(ctx, key, payload, time.Hour)
	b.Cleanup(func() { rdb.Del(ctx, key) })
	get := func() {
		bs, err := rdb.Get(ctx, key).Bytes()
		if err != nil {
			b.Fatal(err)
		}
		var v benchTask
		if err := json.Unmarshal(bs, &v); err != nil {
			b.Fatal(err)
		}
	}
	serialAndParallel(b, get)
}

// BenchmarkGetHit is Cache.Get on a warm key: one GET, envelope check,
// decode, counters.
func BenchmarkGetHit(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c, err := New[benchTask](rdb, &Options[benchTask]{Name: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	key := uniquePrefix() + "hit"
	b.Cleanup(func() { rdb.Del(ctx, key) })
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	if _, err := c.Get(ctx, key, load); err != nil {
		b.Fatal(err)
	}
	get := func() {
		if _, err := c.Get(ctx, key, load); err != nil {
			b.Fatal(err)
		}
	}
	serialAndParallel(b, get)
	if s := c.Stats(); s.Misses != 1 {
		b.Fatalf("%d misses during a hit benchmark", s.Misses)
	}
}

// serialAndParallel runs op as two sub-benchmarks: one goroutine, and
// GOMAXPROCS goroutines.
func serialAndParallel(b *testing.B, op func()) {
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			op()
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				op()
			}
		})
	})
}
