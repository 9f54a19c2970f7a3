package cacheaside

import (
	"context"
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
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
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
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

// BenchmarkGetStale is Cache.Get on an entry past its TTL, inside its
// stale-while-revalidate window, while a refresh holds the lease (so every
// Get serves the old value): to compare with BenchmarkGetHit.
func BenchmarkGetStale(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	clock := newFakeClock()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench", Clock: clock.Now,
		Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoEarlyRefresh: true}})
	key := uniquePrefix() + "stale"
	b.Cleanup(func() { rdb.Del(ctx, key) })
	first := true
	load := func(ctx context.Context) (benchTask, error) {
		if first {
			first = false
			return benchValue, nil
		}
		<-ctx.Done() // the refresh never finishes: the entry stays stale
		return benchTask{}, ctx.Err()
	}
	if _, err := c.Get(ctx, key, load); err != nil {
		b.Fatal(err)
	}
	clock.Advance(2 * time.Minute)
	if _, err := c.Get(ctx, key, load); err != nil { // starts the refresh
		b.Fatal(err)
	}
	for c.Stats().Loads+c.Stats().LoadErrors < 1 || rdb.Get(ctx, key).Val()[2] != 4 {
		time.Sleep(time.Millisecond) // until the entry is "refreshing"
	}
	serialAndParallel(b, func() {
		if _, err := c.Get(ctx, key, load); err != nil {
			b.Fatal(err)
		}
	})
	if s := c.Stats(); s.StaleServed < uint64(b.N) {
		b.Fatalf("only %d of the Gets were served stale", s.StaleServed)
	}
}

// prefixBenchSetup fills Redis with total keys, group of which share one
// org prefix (and one namespace), for the invalidation benchmarks.
func prefixBenchSetup(b *testing.B, rdb *redis.Client, prefix string, total, group int) {
	b.Helper()
	ctx := context.Background()
	const batch = 10000
	for i := 0; i < total-group; i += batch {
		_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for j := i; j < min(i+batch, total-group); j++ {
				p.Set(ctx, prefix+"filler:"+strconv.Itoa(j), "x", time.Hour)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() {
		iter := rdb.Scan(ctx, 0, wire.EscapeGlob(prefix)+"*", 10000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			if keys = append(keys, iter.Val()); len(keys) == batch {
				rdb.Unlink(ctx, keys...)
				keys = keys[:0]
			}
		}
		if len(keys) > 0 {
			rdb.Unlink(ctx, keys...)
		}
	})
}

// BenchmarkInvalidatePrefix deletes a group of 10,000 keys among
// 1,000,000 with InvalidatePrefix (SCAN MATCH + pipelined UNLINK). Only on
// a real Redis: set CACHEASIDE_REDIS_ADDR.
func BenchmarkInvalidatePrefix(b *testing.B) {
	if os.Getenv(envRedisAddr) == "" {
		b.Skip("needs a real Redis: set " + envRedisAddr)
	}
	const total, group = 1_000_000, 10_000
	rdb := benchRedis(b)
	ctx := context.Background()
	prefix := uniquePrefix()
	prefixBenchSetup(b, rdb, prefix, total, group)
	c := benchCache[string](b, rdb, nil)
	orgPrefix := prefix + "org:acme:"
	var deleted int64
	for b.Loop() {
		b.StopTimer()
		if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for j := 0; j < group; j++ {
				p.Set(ctx, orgPrefix+"page:"+strconv.Itoa(j), "x", time.Hour)
			}
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		n, err := c.InvalidatePrefix(ctx, orgPrefix)
		if err != nil || n != group {
			b.Fatalf("InvalidatePrefix = %d, %v", n, err)
		}
		deleted += n
	}
	b.ReportMetric(float64(deleted)/b.Elapsed().Seconds(), "keys/s")
}

// BenchmarkInvalidateNamespace drops the same group as
// BenchmarkInvalidatePrefix with one namespace bump.
func BenchmarkInvalidateNamespace(b *testing.B) {
	if os.Getenv(envRedisAddr) == "" {
		b.Skip("needs a real Redis: set " + envRedisAddr)
	}
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[string](b, rdb, &Options[string]{Namespaced: true})
	ns := MustKeyspace("bench", 1).Namespace(uniquePrefix(), "acme")
	b.Cleanup(func() { rdb.Del(ctx, ns.genKey()) })
	b.ReportAllocs()
	for b.Loop() {
		if err := c.InvalidateNamespace(ctx, ns); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHitVsRaw alternates one raw go-redis GET + json.Unmarshal and
// one Cache.Get hit of the same struct in the same loop, so drift in the
// machine or the network hits both alike, and reports each one's mean
// time and their ratio. The loopback round trip varies by ±25% from run to
// run on a small VM; alternating op by op keeps the ratio steady.
func BenchmarkHitVsRaw(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
	prefix := uniquePrefix()
	rawKey, hitKey := prefix+"raw", prefix+"hit"
	b.Cleanup(func() { rdb.Del(ctx, rawKey, hitKey) })
	payload, _ := json.Marshal(benchValue)
	rdb.Set(ctx, rawKey, payload, time.Hour)
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	if _, err := c.Get(ctx, hitKey, load); err != nil {
		b.Fatal(err)
	}
	var raw, hit time.Duration
	for b.Loop() {
		t0 := time.Now()
		bs, err := rdb.Get(ctx, rawKey).Bytes()
		if err != nil {
			b.Fatal(err)
		}
		var v benchTask
		if err := json.Unmarshal(bs, &v); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := c.Get(ctx, hitKey, load); err != nil {
			b.Fatal(err)
		}
		hit += time.Since(t1)
		raw += t1.Sub(t0)
	}
	b.ReportMetric(float64(raw.Nanoseconds())/float64(b.N), "raw-ns/op")
	b.ReportMetric(float64(hit.Nanoseconds())/float64(b.N), "hit-ns/op")
	b.ReportMetric(float64(hit)/float64(raw), "hit/raw")
}

// BenchmarkTaggedHit is a Redis-tier hit of an entry with two tags (its
// read is one MGET of the entry and both tags' generations) beside a hit of
// an untagged entry and a raw go-redis GET + decode, alternating in one
// loop: tagged/plain is what the tags cost on a hit.
func BenchmarkTaggedHit(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	prefix := uniquePrefix()
	plain := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench-plain"})
	tagged := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench-tagged", Tags: func(string) []string {
		return []string{prefix + "org:acme", prefix + "user:ann"}
	}})
	rawKey, plainKey, taggedKey := prefix+"raw", prefix+"plain", prefix+"tagged"
	b.Cleanup(func() {
		rdb.Del(ctx, rawKey, plainKey, taggedKey, tagged.tagKey(prefix+"org:acme"), tagged.tagKey(prefix+"user:ann"))
	})
	payload, _ := json.Marshal(benchValue)
	rdb.Set(ctx, rawKey, payload, time.Hour)
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	if _, err := plain.Get(ctx, plainKey, load); err != nil {
		b.Fatal(err)
	}
	if _, err := tagged.Get(ctx, taggedKey, load); err != nil {
		b.Fatal(err)
	}
	var raw, hit, tag time.Duration
	for b.Loop() {
		t0 := time.Now()
		bs, err := rdb.Get(ctx, rawKey).Bytes()
		if err != nil {
			b.Fatal(err)
		}
		var v benchTask
		if err := json.Unmarshal(bs, &v); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := plain.Get(ctx, plainKey, load); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if _, err := tagged.Get(ctx, taggedKey, load); err != nil {
			b.Fatal(err)
		}
		tag += time.Since(t2)
		hit += t2.Sub(t1)
		raw += t1.Sub(t0)
	}
	if s := tagged.Stats(); s.Loads != 1 {
		b.Fatalf("the tagged cache loaded %d times: its Gets were not hits", s.Loads)
	}
	b.ReportMetric(float64(raw.Nanoseconds())/float64(b.N), "raw-ns/op")
	b.ReportMetric(float64(hit.Nanoseconds())/float64(b.N), "hit-ns/op")
	b.ReportMetric(float64(tag.Nanoseconds())/float64(b.N), "tagged-ns/op")
	b.ReportMetric(float64(tag)/float64(hit), "tagged/plain")
}

// benchLoad stands in for a fast database query: 1ms.
func benchLoad(context.Context) (benchTask, error) {
	time.Sleep(time.Millisecond)
	return benchValue, nil
}

// BenchmarkBareLoader is the loader alone: what the application would pay
// with no cache at all.
func BenchmarkBareLoader(b *testing.B) {
	ctx := context.Background()
	for b.Loop() {
		_, _ = benchLoad(ctx)
	}
}

// BenchmarkGetBreakerOpen is Get while Redis refuses connections and the
// breaker is open: Redis is skipped and the loader answers.
func BenchmarkGetBreakerOpen(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true, MaxRetries: -1})
	b.Cleanup(func() { rdb.Close() })
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Logger: slog.New(slog.DiscardHandler), Degradation: Degradation{BreakerCooldown: time.Hour}})
	ctx := context.Background()
	for c.Stats().BreakerOpens == 0 {
		_, _ = c.Get(ctx, "k", benchLoad)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		if _, err := c.Get(ctx, "k"+strconv.Itoa(i&63), benchLoad); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGetBlackHoled is Get while Redis accepts connections and never
// answers, with the breaker off, so every Get waits out the operation
// budget (50ms) before the loader answers: the worst case before a breaker
// opens. Needs redis-server installed.
func BenchmarkGetBlackHoled(b *testing.B) {
	if os.Getenv(envFaults) == "" {
		b.Skipf("starts redis-server: set %s=1", envFaults)
	}
	port := 0
	{
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		b.Fatalf("redis-server: %v", err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	upstream := "127.0.0.1:" + strconv.Itoa(port)
	proxy := newProxy(b, upstream)
	addToxic(b, proxy, `{"name":"hole","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
	rdb := redis.NewClient(&redis.Options{Addr: proxy.Listen, ContextTimeoutEnabled: true, MaxRetries: -1})
	b.Cleanup(func() { rdb.Close() })
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Logger: slog.New(slog.DiscardHandler), Degradation: Degradation{NoBreaker: true}})
	ctx := context.Background()
	i := 0
	for b.Loop() {
		i++
		if _, err := c.Get(ctx, "k"+strconv.Itoa(i), benchLoad); err != nil {
			b.Fatal(err)
		}
	}
}

// benchCache builds a Cache for a benchmark and closes it at cleanup.
func benchCache[T any](b *testing.B, rdb Redis, o *Options[T]) *Cache[T] {
	b.Helper()
	c, err := New[T](rdb, o)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return c
}

// BenchmarkGetMany100 reads 100 warm keys three ways in one loop, so the
// three share the machine's state: a raw MGET of 100 JSON values decoded
// one by one (the floor), one GetMany, and 100 single Gets. It reports
// each one's time per batch and the ratios.
func BenchmarkGetMany100(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
	prefix := uniquePrefix()
	const n = 100
	rawKeys, ids := make([]string, n), make([]int, n)
	key := func(id int) string { return prefix + "many:" + strconv.Itoa(id) }
	payload, _ := json.Marshal(benchValue)
	for i := range n {
		ids[i] = i
		rawKeys[i] = prefix + "raw:" + strconv.Itoa(i)
		rdb.Set(ctx, rawKeys[i], payload, time.Hour)
	}
	b.Cleanup(func() {
		rdb.Del(ctx, rawKeys...)
		for _, id := range ids {
			rdb.Del(ctx, key(id))
		}
	})
	load := func(_ context.Context, ids []int) (map[int]benchTask, error) {
		m := make(map[int]benchTask, len(ids))
		for _, id := range ids {
			m[id] = benchValue
		}
		return m, nil
	}
	if _, err := GetMany(ctx, c, ids, key, load); err != nil {
		b.Fatal(err)
	}
	single := func(context.Context) (benchTask, error) { return benchValue, nil }
	var raw, many, singles time.Duration
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		vals, err := rdb.MGet(ctx, rawKeys...).Result()
		if err != nil {
			b.Fatal(err)
		}
		out := make(map[int]benchTask, n)
		for i, v := range vals {
			var t benchTask
			if err := json.Unmarshal([]byte(v.(string)), &t); err != nil {
				b.Fatal(err)
			}
			out[i] = t
		}
		t1 := time.Now()
		got, err := GetMany(ctx, c, ids, key, load)
		if err != nil || len(got) != n {
			b.Fatal(len(got), err)
		}
		t2 := time.Now()
		for _, id := range ids {
			if _, err := c.Get(ctx, key(id), single); err != nil {
				b.Fatal(err)
			}
		}
		raw += t1.Sub(t0)
		many += t2.Sub(t1)
		singles += time.Since(t2)
	}
	N := float64(b.N)
	b.ReportMetric(float64(raw.Nanoseconds())/N, "rawMGET-ns/batch")
	b.ReportMetric(float64(many.Nanoseconds())/N, "GetMany-ns/batch")
	b.ReportMetric(float64(singles.Nanoseconds())/N, "100Gets-ns/batch")
	b.ReportMetric(float64(many)/float64(raw), "GetMany/raw")
	b.ReportMetric(float64(singles)/float64(many), "100Gets/GetMany")
	if s := c.Stats(); s.Misses != n {
		b.Fatalf("%d misses, want only the %d of the warm-up", s.Misses, n)
	}
}

// BenchmarkLocalHit is Cache.Get answered by the local tier: serial time
// and allocations per Get, and Gets per second over all cores. Targets on
// the 2-core machine: at most 300 ns serial, at least 4 M Gets/s parallel.
func BenchmarkLocalHit(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench",
		Local: &LocalOptions{TTL: time.Hour, Channel: uniquePrefix() + "bus"}})
	for !c.local.live.Load() {
		time.Sleep(time.Millisecond)
	}
	prefix := uniquePrefix()
	const nkeys = 1024
	keys := make([]string, nkeys)
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	for i := range keys {
		keys[i] = prefix + "local:" + strconv.Itoa(i)
		if _, err := c.Get(ctx, keys[i], load); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { rdb.Del(ctx, keys...) })
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := c.Get(ctx, keys[i%nkeys], load); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(nkeys)
			for pb.Next() {
				if _, err := c.Get(ctx, keys[i%nkeys], load); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "gets/s")
	})
	if s := c.Stats(); s.Misses != nkeys || s.LocalHits == 0 {
		b.Fatalf("stats %+v: the local tier did not answer", s)
	}
}

// BenchmarkRedisTier64 is throughput with 64 goroutines on the 2-core
// machine, over 1,024 warm keys: raw go-redis GET + json.Unmarshal beside
// Cache.Get hits served by Redis (no local tier). Each sub-benchmark
// reports Gets per second.
func BenchmarkRedisTier64(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
	prefix := uniquePrefix()
	const nkeys = 1024
	raw, hit := make([]string, nkeys), make([]string, nkeys)
	payload, _ := json.Marshal(benchValue)
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	for i := range nkeys {
		raw[i], hit[i] = prefix+"raw:"+strconv.Itoa(i), prefix+"hit:"+strconv.Itoa(i)
		rdb.Set(ctx, raw[i], payload, time.Hour)
		if _, err := c.Get(ctx, hit[i], load); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { rdb.Del(ctx, raw...); rdb.Del(ctx, hit...) })
	run := func(b *testing.B, get func(i int)) {
		b.ReportAllocs()
		b.SetParallelism(64 / runtime.GOMAXPROCS(0))
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(nkeys)
			for pb.Next() {
				get(i % nkeys)
				i++
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "gets/s")
	}
	b.Run("raw", func(b *testing.B) {
		run(b, func(i int) {
			bs, err := rdb.Get(ctx, raw[i]).Bytes()
			if err != nil {
				b.Fatal(err)
			}
			var v benchTask
			if err := json.Unmarshal(bs, &v); err != nil {
				b.Fatal(err)
			}
		})
	})
	b.Run("cache", func(b *testing.B) {
		run(b, func(i int) {
			if _, err := c.Get(ctx, hit[i], load); err != nil {
				b.Fatal(err)
			}
		})
	})
}

// BenchmarkClientSideCachingHit is Cache.Get on a client with go-redis's
// server-assisted client-side caching (RESP3, CLIENT TRACKING), the
// alternative to the local tier: GET is answered from the client's memory,
// and the cache still decodes the entry and the value. Real Redis only.
func BenchmarkClientSideCachingHit(b *testing.B) {
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		b.Skip("needs a real Redis: set " + envRedisAddr)
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr, Protocol: 3, ContextTimeoutEnabled: true,
		ClientSideCacheConfig: &redis.ClientSideCacheConfig{MaxEntries: 10000}})
	b.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
	key := uniquePrefix() + "csc"
	b.Cleanup(func() { rdb.Del(ctx, key) })
	load := func(context.Context) (benchTask, error) { return benchValue, nil }
	if _, err := c.Get(ctx, key, load); err != nil {
		b.Fatal(err)
	}
	serialAndParallel(b, func() {
		if _, err := c.Get(ctx, key, load); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkGetMiss is Get on a cold key: the read that misses, the lease,
// one loader call (instant) and the fill. Beside it, in the same loop, the
// raw go-redis GET + decode, so the ratio says how many round trips a miss
// costs.
func BenchmarkGetMiss(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	c := benchCache[benchTask](b, rdb, &Options[benchTask]{Name: "bench"})
	prefix := uniquePrefix()
	rawKey := prefix + "raw"
	payload, _ := json.Marshal(benchValue)
	rdb.Set(ctx, rawKey, payload, time.Hour)
	var loads int
	load := func(context.Context) (benchTask, error) { loads++; return benchValue, nil }
	var raw, miss time.Duration
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		i++
		t0 := time.Now()
		bs, err := rdb.Get(ctx, rawKey).Bytes()
		if err != nil {
			b.Fatal(err)
		}
		var v benchTask
		if err := json.Unmarshal(bs, &v); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := c.Get(ctx, prefix+"miss:"+strconv.Itoa(i), load); err != nil {
			b.Fatal(err)
		}
		miss += time.Since(t1)
		raw += t1.Sub(t0)
	}
	b.ReportMetric(float64(miss.Nanoseconds())/float64(b.N), "miss-ns/op")
	b.ReportMetric(float64(miss)/float64(raw), "miss/raw")
	if loads != b.N {
		b.Fatalf("%d loads for %d cold Gets", loads, b.N)
	}
	b.Cleanup(func() {
		iter := rdb.Scan(ctx, 0, wire.EscapeGlob(prefix)+"*", 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Unlink(ctx, iter.Val())
		}
	})
}

// BenchmarkStampede4x250 is one cold key read at once by 4 Cache instances
// (each with its own client, like 4 processes), 250 goroutines each, with a
// 50ms loader; each iteration is one such stampede on a new key. It
// reports the loads per stampede and the p50, p99 and max latency of the
// 1,000 Gets: the ones in the 3 instances that wait are woken by the
// fill's message.
func BenchmarkStampede4x250(b *testing.B) {
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		mr := miniredis.RunT(b)
		addr = mr.Addr()
	}
	caches := make([]*Cache[string], 4)
	for i := range caches {
		rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true}) // go-redis defaults otherwise
		b.Cleanup(func() { _ = rdb.Close() })
		caches[i] = benchCache[string](b, rdb, &Options[string]{Name: "stampede"})
		for !caches[i].wake.live.Load() {
			time.Sleep(time.Millisecond)
		}
	}
	prefix := uniquePrefix()
	var all []time.Duration
	var loads atomic.Int64
	load := func(context.Context) (string, error) {
		loads.Add(1)
		time.Sleep(50 * time.Millisecond)
		return "v", nil
	}
	i := 0
	for b.Loop() {
		i++
		lat, _, _ := stampedeOnce(b, caches, 250, prefix+"hot:"+strconv.Itoa(i), load)
		all = append(all, lat...)
	}
	reportStampede(b, all, loads.Load())
}

// stampedeOnce runs one stampede: per goroutines of each cache Get key at
// once. It returns each Get's latency and when it returned (both in the
// order of the goroutines: a Get began at ends[i] - lat[i]), and
// when they were let go.
func stampedeOnce(b *testing.B, caches []*Cache[string], per int, key string, load Loader[string]) (lat []time.Duration, ends []time.Time, began time.Time) {
	lat = make([]time.Duration, per*len(caches))
	ends = make([]time.Time, len(lat))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for ci, c := range caches {
		for g := range per {
			wg.Go(func() {
				<-start
				t0 := time.Now()
				if _, err := c.Get(context.Background(), key, load); err != nil {
					b.Error(err)
				}
				ends[ci*per+g] = time.Now()
				lat[ci*per+g] = ends[ci*per+g].Sub(t0)
			})
		}
	}
	began = time.Now()
	close(start)
	wg.Wait()
	return lat, ends, began
}

// reportStampede reports the loads per stampede and the p50, p99 and max
// of all the Gets' latencies.
func reportStampede(b *testing.B, all []time.Duration, loads int64) {
	slices.Sort(all)
	pct := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))]) / 1e6 }
	b.ReportMetric(float64(loads)/float64(b.N), "loads/stampede")
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(pct(1), "max-ms")
}

// BenchmarkStampede1x1000 is the in-process stampede: 1,000 goroutines of
// one Cache on one cold key, 50ms loader; each iteration is one such
// stampede on a new key. It reports the loads per stampede, the p50, p99
// and max latency of the Gets, and where the time beyond the loader goes:
// from the start to the loader's call (the goroutines starting, the read
// that misses, the lease round), and from the loader's return to the
// first and to the 99th-percentile Get's return (the fill's round trip,
// then waking the waiters). begun-before-read is the share of the Gets
// that had begun when the first read's reply was read: the runtime reads
// the network once it has nothing else to run.
func BenchmarkStampede1x1000(b *testing.B) {
	rdb := benchRedis(b)
	c := benchCache[string](b, rdb, &Options[string]{Name: "stampede1"})
	var firstRead atomic.Int64 // when the stampede's first read returned (UnixNano)
	c.hooks = &testHooks{afterRead: func(string) { firstRead.CompareAndSwap(0, time.Now().UnixNano()) }}
	prefix := uniquePrefix()
	var all, toLoader, toFirst, toP99 []time.Duration
	var begunBefore []float64
	var loads atomic.Int64
	const loader = 50 * time.Millisecond
	var loadStart, loadEnd time.Time
	load := func(context.Context) (string, error) {
		loads.Add(1)
		loadStart = time.Now()
		time.Sleep(loader)
		loadEnd = time.Now()
		return "v", nil
	}
	i := 0
	for b.Loop() {
		i++
		firstRead.Store(0)
		lat, ends, began := stampedeOnce(b, []*Cache[string]{c}, 1000, prefix+"hot:"+strconv.Itoa(i), load)
		all = append(all, lat...)
		read, n := time.Unix(0, firstRead.Load()), 0
		for g, end := range ends {
			if end.Add(-lat[g]).Before(read) {
				n++
			}
		}
		begunBefore = append(begunBefore, float64(n)/float64(len(lat)))
		slices.SortFunc(ends, func(a, b time.Time) int { return a.Compare(b) })
		toLoader = append(toLoader, loadStart.Sub(began))
		toFirst = append(toFirst, ends[0].Sub(loadEnd))
		toP99 = append(toP99, ends[989].Sub(loadEnd))
	}
	reportStampede(b, all, loads.Load())
	median := func(d []time.Duration) float64 { slices.Sort(d); return float64(d[len(d)/2]) / 1e6 }
	b.ReportMetric(median(toLoader), "to-loader-ms")
	b.ReportMetric(median(toFirst), "loader-to-first-ms")
	b.ReportMetric(median(toP99), "loader-to-p99-ms")
	slices.Sort(begunBefore)
	b.ReportMetric(begunBefore[len(begunBefore)/2], "begun-before-read")
}

// BenchmarkSoftTimeout: 1,000 goroutines Get a key whose value is past its
// TTL and inside StaleIfError, while its reload takes 2 s; SoftLoadTimeout
// is 100 ms. It reports the Gets' latencies, the reloads per stampede
// (loads/stampede), the share of Gets answered with the old value
// (old-answers), and the share of stampedes after which, once the reload
// had filled, a Get read the new value without a load (fresh-after).
func BenchmarkSoftTimeout(b *testing.B) {
	rdb := benchRedis(b)
	ctx := context.Background()
	clock := newFakeClock()
	c := benchCache[string](b, rdb, &Options[string]{Name: "soft", Policy: softPolicy, Clock: clock.Now,
		SoftLoadTimeout: 100 * time.Millisecond, LoadTimeout: 5 * time.Second})
	prefix := uniquePrefix()
	var loads atomic.Int64
	reload := func(context.Context) (string, error) {
		loads.Add(1)
		time.Sleep(2 * time.Second)
		return "new", nil
	}
	const n = 1000
	var all []time.Duration
	var old, fresh int
	i := 0
	for b.Loop() {
		i++
		key := prefix + "soft:" + strconv.Itoa(i)
		if err := c.Set(ctx, key, "old"); err != nil {
			b.Fatal(err)
		}
		clock.Advance(2 * time.Minute)
		lat, vals := make([]time.Duration, n), make([]string, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range n {
			wg.Go(func() {
				<-start
				t0 := time.Now()
				v, err := c.Get(ctx, key, reload)
				lat[g], vals[g] = time.Since(t0), v
				if err != nil {
					b.Error(err)
				}
			})
		}
		close(start)
		wg.Wait()
		all = append(all, lat...)
		for _, v := range vals {
			if v == "old" {
				old++
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			var e envelope.Entry
			raw, _ := rdb.Get(ctx, key).Bytes()
			if envelope.Decode(raw, &e) == nil && e.Kind == envelope.Value {
				break
			}
			if time.Now().After(deadline) {
				b.Fatal("the reload did not fill within 5 s")
			}
			time.Sleep(10 * time.Millisecond)
		}
		before := loads.Load()
		if v, err := c.Get(ctx, key, reload); err == nil && v == "new" && loads.Load() == before {
			fresh++
		}
	}
	reportStampede(b, all, loads.Load())
	b.ReportMetric(float64(old)/float64(len(all)), "old-answers")
	b.ReportMetric(float64(fresh)/float64(b.N), "fresh-after")
}
