package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// localCache builds a Cache with a local tier on b and waits until its
// bus subscription is confirmed.
func localCache[T any](t *testing.T, b *backend, o *Options[T]) *Cache[T] {
	t.Helper()
	if o == nil {
		o = &Options[T]{}
	}
	if o.Local == nil {
		o.Local = &LocalOptions{}
	}
	if o.Local.Channel == "" {
		o.Local.Channel = b.key("bus")
	}
	c := newCache(t, b, o)
	waitFor(t, "the bus subscription", c.local.live.Load)
	return c
}

func TestLocalTierServesFromMemory(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clk := newFakeClock()
		c := localCache(t, b, &Options[string]{Clock: clk.Now, Local: &LocalOptions{TTL: time.Second}})
		key := b.key("k")
		var n counter
		for range 3 {
			if v, err := c.Get(ctx, key, n.load("v1", 0)); err != nil || v != "v1" {
				t.Fatalf("Get = %q, %v", v, err)
			}
		}
		if s := c.Stats(); s.LocalHits != 2 || s.Hits != 2 || s.Misses != 1 || n.calls.Load() != 1 {
			t.Fatalf("stats %+v, %d loads; want 2 local hits after one load", s, n.calls.Load())
		}
		// Delete the entry behind the cache's back (no bus message): the
		// local copy is served until its local TTL ends, then Redis is read.
		if err := b.client(t).Del(ctx, key).Err(); err != nil {
			t.Fatal(err)
		}
		if v, _ := c.Get(ctx, key, n.load("v2", 0)); v != "v1" {
			t.Fatalf("within the local TTL: %q, want v1 from memory", v)
		}
		clk.Advance(time.Second)
		if v, _ := c.Get(ctx, key, n.load("v2", 0)); v != "v2" {
			t.Fatalf("after the local TTL: %q, want v2", v)
		}
		// "Not found" is kept locally too.
		missing := b.key("missing")
		for range 2 {
			if _, err := c.Get(ctx, missing, func(context.Context) (string, error) { n.calls.Add(1); return "", ErrNotFound }); !errors.Is(err, ErrNotFound) {
				t.Fatalf("missing: %v", err)
			}
		}
		if s := c.Stats(); s.LocalHits != 3 || s.LocalNegativeHits != 1 || s.LocalHits > s.Hits || s.LocalNegativeHits > s.NegativeHits || n.calls.Load() != 3 {
			t.Fatalf("stats %+v, %d loads", s, n.calls.Load())
		}
	})
}

// A local copy never outlives the Redis entry's own TTL.
func TestLocalTierCappedByRedisTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clk := newFakeClock()
		c := localCache(t, b, &Options[string]{Clock: clk.Now, Local: &LocalOptions{TTL: time.Hour},
			Policy: Policy{TTL: time.Minute, NoJitter: true, NoEarlyRefresh: true}})
		key := b.key("k")
		var n counter
		if _, err := c.Get(ctx, key, n.load("v1", 0)); err != nil {
			t.Fatal(err)
		}
		clk.Advance(59 * time.Second)
		if _, err := c.Get(ctx, key, n.load("v1", 0)); err != nil || c.Stats().LocalHits != 1 {
			t.Fatalf("before the Redis TTL: %v, stats %+v", err, c.Stats())
		}
		clk.Advance(2 * time.Second)
		if v, err := c.Get(ctx, key, n.load("v2", 0)); err != nil || v != "v2" || c.Stats().LocalHits != 1 {
			t.Fatalf("past the Redis TTL: %q %v, stats %+v; want a reload", v, err, c.Stats())
		}
	})
}

// Every kind of invalidation made on one instance reaches the other's
// local tier.
func TestLocalTierCoherentAcrossInstances(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		o := func() *Options[string] {
			return &Options[string]{Namespaced: false, Local: &LocalOptions{TTL: time.Hour}}
		}
		c1, c2 := localCache(t, b, o()), localCache(t, b, o())
		version := map[string]int{}
		load := func(key string) Loader[string] {
			return func(context.Context) (string, error) { return fmt.Sprint(key, "@", version[key]), nil }
		}
		key := b.key("item:1")
		warm := func(keys ...string) {
			t.Helper()
			for _, k := range keys {
				for range 2 {
					if _, err := c2.Get(ctx, k, load(k)); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		sees := func(what, k string) {
			t.Helper()
			want := fmt.Sprint(k, "@", version[k])
			waitFor(t, what+" to reach the other instance", func() bool {
				v, err := c2.Get(ctx, k, load(k))
				return err == nil && v == want
			})
		}

		warm(key)
		version[key]++
		if _, err := c1.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		sees("Invalidate", key)

		warm(key)
		version[key]++
		if err := c1.Set(ctx, key, fmt.Sprint(key, "@", version[key])); err != nil {
			t.Fatal(err)
		}
		sees("Set", key)

		k2, k3 := b.key("list:a:1"), b.key("list:a:2")
		warm(k2, k3)
		version[k2]++
		version[k3]++
		if _, err := c1.InvalidatePrefix(ctx, b.key("list:a:")); err != nil {
			t.Fatal(err)
		}
		sees("InvalidatePrefix", k2)
		sees("InvalidatePrefix", k3)
		if s := c2.Stats(); s.LocalHits == 0 || s.BusMessages < 3 {
			t.Fatalf("stats %+v: the local tier was never used, or no message came", s)
		}
	})
}

func TestLocalTierNamespaceBump(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		o := func() *Options[string] {
			return &Options[string]{Namespaced: true, Local: &LocalOptions{TTL: time.Hour}}
		}
		c1, c2 := localCache(t, b, o()), localCache(t, b, o())
		ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
		key := ns.Key("page", "1")
		gen := 0
		load := func(context.Context) (string, error) { return strconv.Itoa(gen), nil }
		for range 2 {
			if _, err := c2.Get(ctx, key, load); err != nil {
				t.Fatal(err)
			}
		}
		if c2.Stats().LocalHits != 1 {
			t.Fatalf("stats %+v", c2.Stats())
		}
		gen++
		global := c2.local.global.Load()
		if err := c1.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the bump to reach the other instance", func() bool {
			v, err := c2.Get(ctx, key, load)
			return err == nil && v == "1"
		})
		if c2.local.global.Load() != global {
			t.Fatal("a namespace bump walked the local tier (moved the global epoch) instead of moving its namespace's epoch")
		}
	})
}

// When the subscription drops, the local tier is emptied and bypassed
// until a new subscription is confirmed, so nothing published meanwhile
// can be missed.
func TestLocalTierFlushedWhenBusDrops(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour, HealthCheck: 50 * time.Millisecond}})
		key := b.key("k")
		var n counter
		for range 2 {
			if _, err := c.Get(ctx, key, n.load("v1", 0)); err != nil {
				t.Fatal(err)
			}
		}
		flushes := c.Stats().LocalFlushes
		// Change Redis behind the bus's back, then cut the subscription.
		if err := b.client(t).Del(ctx, key).Err(); err != nil {
			t.Fatal(err)
		}
		if b.mr != nil {
			b.mr.Close()
			if err := b.mr.Restart(); err != nil {
				t.Fatal(err)
			}
		} else {
			if err := b.client(t).Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, "the local tier to be flushed", func() bool { return c.Stats().LocalFlushes > flushes })
		if v, err := c.Get(ctx, key, n.load("v2", 0)); err != nil || v != "v2" {
			t.Fatalf("after the bus dropped: %q %v, want v2 from a reload", v, err)
		}
		waitFor(t, "the bus to come back", c.local.live.Load)
		if _, err := c.Get(ctx, key, n.load("v3", 0)); err != nil {
			t.Fatal(err)
		}
		before := c.Stats().LocalHits
		if v, _ := c.Get(ctx, key, n.load("v3", 0)); v != "v2" || c.Stats().LocalHits != before+1 {
			t.Fatalf("local tier not used again after the bus came back: %q %+v", v, c.Stats())
		}
	})
}

// An invalidation that arrives while a read is on its way must win: the
// read's older value is not stored locally afterwards.
func TestLocalTierReadRacingInvalidation(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	c := localCache(t, b, &Options[string]{Local: &LocalOptions{TTL: time.Hour}})
	key := b.key("k")
	var n counter
	if _, err := c.Get(ctx0, key, n.load("old", 0)); err != nil {
		t.Fatal(err)
	}
	c.local.flush() // as after a bus reconnect: the next Get reads Redis ("old")
	var once atomic.Bool
	c.hooks = &testHooks{afterRead: func(k string) {
		if once.CompareAndSwap(false, true) {
			c.local.apply(string(keysMessage([]string{k}))) // the message overtakes the read
		}
	}}
	if v, _ := c.Get(ctx0, key, n.load("new", 0)); v != "old" {
		t.Fatalf("got %q", v)
	}
	if _, ok := c.local.lookup(key, time.Now().UnixNano()); ok {
		t.Fatal("the read stored its value locally after an invalidation that came during it")
	}
	c.hooks = nil
	if _, err := c.Get(ctx0, key, n.load("new", 0)); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.local.lookup(key, time.Now().UnixNano()); !ok {
		t.Fatal("a read with no invalidation during it was not stored locally")
	}
}

var ctx0 = context.Background()

func TestLocalTierOptions(t *testing.T) {
	mr := miniredisRun(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	for _, lo := range []LocalOptions{{MaxEntries: -1}, {TTL: -time.Second}, {TTL: time.Microsecond}, {HealthCheck: time.Millisecond}} {
		if _, err := New(rdb, &Options[string]{Local: &lo}); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%+v: %v, want ErrInvalidOptions", lo, err)
		}
	}
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": mr.Addr()}})
	defer ring.Close()
	if _, err := New(ring, &Options[string]{Local: &LocalOptions{}}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("Ring: %v, want ErrInvalidOptions", err)
	}
	noBus := struct{ Redis }{rdb}
	if _, err := New[string](noBus, &Options[string]{Local: &LocalOptions{}}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("client without pub/sub: %v, want ErrInvalidOptions", err)
	}
}

// A message the tier cannot read flushes it rather than being ignored.
func TestLocalTierBadMessageFlushes(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	c := localCache[string](t, b, nil)
	for _, msg := range []string{"", "x", "k\x05ab"} {
		before := c.Stats().LocalFlushes
		if err := c.local.apply(msg); err == nil {
			t.Errorf("%q: no error", msg)
		}
		if c.Stats().LocalFlushes != before+1 {
			t.Errorf("%q: not flushed", msg)
		}
	}
	keys := []string{"a", "", "ü:{x}", string(make([]byte, 300))}
	msg := keysMessage(keys)
	var got []string
	rest := msg[1:]
	for len(rest) > 0 {
		n, w := int(rest[0]), 1
		if n >= 0x80 {
			n, w = int(rest[0]&0x7f)|int(rest[1])<<7, 2
		}
		got = append(got, string(rest[w:w+n]))
		rest = rest[w+n:]
	}
	if !slices.Equal(got, keys) {
		t.Fatalf("keys message round trip: %q", got)
	}
}

// TestLocalTierStaleness measures how long after an Invalidate on one
// instance returns the other instance, holding the old value in its local
// tier, serves the new one: 10,000 trials. The bound it must never break
// is LocalOptions.TTL (what a lost message would cost); the figure it
// reports is the distribution, which is what the bus delivers.
func TestLocalTierStaleness(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		const bound = time.Second
		o := func() *Options[int64] { return &Options[int64]{Local: &LocalOptions{TTL: bound}} }
		writer, reader := localCache(t, b, o()), localCache(t, b, o())
		measureStaleness(t, "local tier, "+b.name, writer, reader, b.key("staleness"), bound, int(staleTrials()))
		if s := reader.Stats(); s.LocalHits < staleTrials() {
			t.Fatalf("only %d local hits in %d trials: the reader was not serving from memory", s.LocalHits, staleTrials())
		}
	})
}

// TestClientSideCachingStaleness is the same measurement with go-redis's
// server-assisted client-side caching (RESP3, CLIENT TRACKING) in place of
// the local tier: the reader's client keeps GET replies in memory, and
// Redis pushes an invalidation when the key changes. Real Redis only; 2,000
// trials.
func TestClientSideCachingStaleness(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		if b.mr == nil {
			csc := redis.NewClient(&redis.Options{Addr: b.addr, Protocol: 3, ContextTimeoutEnabled: true,
				ClientSideCacheConfig: &redis.ClientSideCacheConfig{MaxEntries: 10000}})
			defer csc.Close()
			reader, err := New[int64](csc, &Options[int64]{Degradation: Degradation{OpTimeout: 2 * time.Second}})
			if err != nil {
				t.Fatal(err)
			}
			defer reader.Close()
			writer := newCache[int64](t, b, nil)
			measureStaleness(t, "go-redis client-side caching, "+b.name, writer, reader, b.key("staleness"), time.Second, int(staleTrials())/5)
		}
	})
}

func staleTrials() uint64 {
	if testing.Short() {
		return 1000
	}
	return 10000
}

// measureStaleness runs the trials: the reader holds version i-1, the
// writer commits version i and invalidates, and the reader Gets until it
// sees i. It fails if any trial takes longer than bound, and logs the
// distribution of the time from Invalidate's return to the new value.
func measureStaleness(t *testing.T, name string, writer, reader *Cache[int64], key string, bound time.Duration, trials int) {
	t.Helper()
	ctx := context.Background()
	var db atomic.Int64
	load := func(context.Context) (int64, error) { return db.Load(), nil }
	lat := make([]time.Duration, trials)
	staleReads := 0
	for i := range trials {
		want := int64(i)
		// The reader holds the current version in memory.
		for range 2 {
			if v, err := reader.Get(ctx, key, load); err != nil || v != want-1 && i > 0 {
				t.Fatalf("trial %d: warm-up Get = %d, %v", i, v, err)
			}
		}
		db.Store(want)
		if _, err := writer.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for {
			v, err := reader.Get(ctx, key, load)
			if err != nil {
				t.Fatal(err)
			}
			if v == want {
				break
			}
			staleReads++
			// A reader that polls without pause would keep the goroutine
			// that applies invalidations off the CPU on a 2-core machine
			// and measure the scheduler; a request handler pauses at its
			// own I/O.
			time.Sleep(20 * time.Microsecond)
			if time.Since(start) > bound {
				t.Fatalf("trial %d: the reader still served %d %v after Invalidate returned", i, v, time.Since(start))
			}
		}
		lat[i] = time.Since(start)
	}
	slices.Sort(lat)
	q := func(p float64) time.Duration { return lat[int(p*float64(trials-1))] }
	t.Logf("staleness (%s): %d trials; new value served after Invalidate returned: p50 %v, p99 %v, max %v; %d stale reads in all (bound %v)",
		name, trials, q(0.5).Round(time.Microsecond), q(0.99).Round(time.Microsecond), lat[trials-1].Round(time.Microsecond), staleReads, bound)
}

// GetMany uses the local tier too: a second batch is answered from memory
// (values and "not found"), and an invalidation on another instance
// reaches it.
func TestLocalTierGetMany(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		o := func() *Options[string] { return &Options[string]{Local: &LocalOptions{TTL: time.Hour}} }
		c1, c2 := localCache(t, b, o()), localCache(t, b, o())
		key := func(id int) string { return b.key(fmt.Sprint("item:", id)) }
		bl := &batchCounter{absent: map[int]bool{3: true}}
		for range 2 {
			got, err := GetMany(ctx, c2, []int{0, 1, 2, 3, 1}, key, bl.load)
			if err != nil || len(got) != 3 {
				t.Fatalf("GetMany: %v %v", got, err)
			}
		}
		if s := c2.Stats(); s.LocalHits != 3 || s.LocalNegativeHits != 1 || s.Hits != 3 || s.NegativeHits != 1 || s.Misses != 4 {
			t.Fatalf("stats %+v: want the second batch answered by the local tier", s)
		}
		if calls, _ := bl.stats(); calls != 1 {
			t.Fatalf("%d loader calls, want 1", calls)
		}
		bl2 := &batchCounter{}
		if _, err := c1.Invalidate(ctx, key(3)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the invalidation to reach the batch", func() bool {
			got, err := GetMany(ctx, c2, []int{0, 3}, key, bl2.load)
			return err == nil && got[3] == "v3"
		})
		if _, asked := bl2.stats(); !slices.Equal(asked[len(asked)-1], []int{3}) {
			t.Fatalf("asked %v, want only the invalidated id", asked)
		}
	})
}

// A namespace bump that arrives while a read is on its way: the value the
// read stores is never served locally.
func TestLocalTierReadRacingNamespaceBump(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	c := localCache(t, b, &Options[string]{Namespaced: true, Local: &LocalOptions{TTL: time.Hour}})
	ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
	key := ns.Key("page", "1")
	var n counter
	if _, err := c.Get(ctx0, key, n.load("old", 0)); err != nil {
		t.Fatal(err)
	}
	c.local.flush() // the next Get reads Redis ("old")
	var once atomic.Bool
	c.hooks = &testHooks{afterRead: func(string) {
		if once.CompareAndSwap(false, true) {
			_ = c.local.apply(string(append([]byte{msgNamespace}, ns.genKey()...)))
		}
	}}
	if v, _ := c.Get(ctx0, key, n.load("new", 0)); v != "old" {
		t.Fatalf("got %q", v)
	}
	if _, ok := c.local.lookup(key, time.Now().UnixNano()); ok {
		t.Fatal("a value read before a namespace bump is served locally after it")
	}
	c.hooks = nil
	if _, err := c.Get(ctx0, key, n.load("new", 0)); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.local.lookup(key, time.Now().UnixNano()); !ok {
		t.Fatal("a read after the bump was not kept locally")
	}
}
