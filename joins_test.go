package cacheaside

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Regression tests for joins of in-process loads that began before a write
// made elsewhere, and for namespace generation upkeep.

// P1 loads under a namespace; P2 bumps the namespace after a write; a Get
// on P1 that starts after the bump returned joins P1's old load and gets the
// pre-write value, because the old-generation lease still sits under the key
// and its token matches what the flight published.
func TestJoinAfterNamespaceBumpInOtherProcess(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		p1 := newCache(t, b, &Options[int64]{Namespaced: true})
		p2 := newCache(t, b, &Options[int64]{Namespaced: true})
		ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
		key := ns.Key("page", "1")
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		missed := make(chan struct{}) // closed when the second Get has joined
		var armed atomic.Bool
		var once sync.Once
		p1.hooks = &testHooks{joined: func(string) {
			if armed.Load() {
				once.Do(func() { close(missed) })
			}
		}}
		var first atomic.Bool
		load := func(context.Context) (int64, error) {
			v := db.Load()
			if first.CompareAndSwap(false, true) {
				close(inLoad)
				<-resume
			}
			return v, nil
		}
		go func() { _, _ = p1.Get(ctx, key, load) }()
		<-inLoad
		db.Store(2) // commit
		if err := p2.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		// the bump has returned; a new Get on p1 starts now
		got := make(chan int64, 1)
		armed.Store(true)
		go func() { v, _ := p1.Get(ctx, key, load); got <- v }()
		<-missed // it joined the load in flight
		close(resume)
		if v := <-got; v != 2 {
			t.Fatalf("Get started after InvalidateNamespace returned = v%d, want v2", v)
		}
	})
}

// Control: the same history with Invalidate instead of a bump is caught by
// the holds check.
func TestJoinAfterInvalidateInOtherProcess(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		p1 := newCache[int64](t, b, nil)
		p2 := newCache[int64](t, b, nil)
		key := b.key("k")
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		missed := make(chan struct{}) // closed when the second Get has joined
		var armed atomic.Bool
		var once sync.Once
		p1.hooks = &testHooks{joined: func(string) {
			if armed.Load() {
				once.Do(func() { close(missed) })
			}
		}}
		var first atomic.Bool
		load := func(context.Context) (int64, error) {
			v := db.Load()
			if first.CompareAndSwap(false, true) {
				close(inLoad)
				<-resume
			}
			return v, nil
		}
		go func() { _, _ = p1.Get(ctx, key, load) }()
		<-inLoad
		db.Store(2)
		if _, err := p2.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		armed.Store(true)
		go func() { v, _ := p1.Get(ctx, key, load); got <- v }()
		<-missed // it joined the load in flight
		close(resume)
		if v := <-got; v != 2 {
			t.Fatalf("Get = v%d, want v2", v)
		}
		// The second Get started over once; it still counts as one Get.
		waitFor(t, "both Gets to be counted", func() bool { return p1.Stats().requests() >= 2 })
		if n := p1.Stats().requests(); n != 2 {
			t.Fatalf("Stats counted %d Gets, want 2", n)
		}
	})
}

// Refreshes (XFetch / SWR) never renew the namespace generation key, so a
// namespace kept warm by refreshes loses every entry at once when it expires.
func TestGenerationKeyRenewedByRefresh(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	ctx := context.Background()
	clock := newFakeClock()
	c := newCache(t, b, &Options[int64]{Namespaced: true, Clock: clock.Now,
		Policy: Policy{TTL: time.Minute, NoJitter: true, Beta: 1e9}})
	ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
	key := ns.Key("page", "1")
	var n atomic.Int64
	load := func(context.Context) (int64, error) { return n.Add(1), nil }
	_, _ = c.Get(ctx, key, load)
	for i := 0; i < 6; i++ {
		clock.Advance(40 * time.Second)
		mr.FastForward(40 * time.Second)
		before := c.Stats().Refreshes
		_, _ = c.Get(ctx, key, load) // a hit; XFetch refreshes
		waitFor(t, "refresh", func() bool { return c.Stats().Refreshes > before || c.Stats().Misses > 1 })
		t.Logf("t=%ds gen PTTL=%v entry PTTL=%v misses=%d refreshes=%d", 40*(i+1), mr.TTL(ns.genKey()), mr.TTL(key), c.Stats().Misses, c.Stats().Refreshes)
	}
	if m := c.Stats().Misses; m > 1 {
		t.Fatalf("a key refreshed every 40s (TTL 1m) missed %d times: the generation key expired under it", m-1)
	}
}

// failOnceGet fails the next GET while fail is set.
type failOnceGet struct {
	*redis.Client
	fail atomic.Bool
}

func (f *failOnceGet) Get(ctx context.Context, key string) *redis.StringCmd {
	if f.fail.CompareAndSwap(true, false) {
		cmd := redis.NewStringCmd(ctx, "get", key)
		cmd.SetErr(errors.New("i/o timeout"))
		return cmd
	}
	return f.Client.Get(ctx, key)
}

// A flight started on a failed GET (redisDown) calls the loader without
// ever marking itself observing, so a Get that starts after another
// process's invalidation trusts it and gets its pre-write value.
func TestJoinOfLoadStartedAfterRedisError(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &failOnceGet{Client: b.client(t)}
		p1, err := New[int64](rdb, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p1.Close() })
		p2 := newCache[int64](t, b, nil)
		key := b.key("k")
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		var first atomic.Bool
		load := func(context.Context) (int64, error) {
			v := db.Load()
			if first.CompareAndSwap(false, true) {
				close(inLoad)
				<-resume
			}
			return v, nil
		}
		rdb.fail.Store(true)
		go func() { _, _ = p1.Get(ctx, key, load) }() // its GET fails: the engine loads without Redis
		<-inLoad
		db.Store(2)
		if _, err := p2.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		reached := make(chan struct{})
		var once sync.Once
		p1.hooks = &testHooks{joined: func(string) { once.Do(func() { close(reached) }) }}
		go func() { v, _ := p1.Get(ctx, key, load); got <- v }()
		<-reached // it joined the load in flight, or started its own
		close(resume)
		if v := <-got; v != 2 {
			t.Fatalf("Get started after Invalidate returned = v%d, want v2", v)
		}
	})
}

func TestNamespaceTagKeyForgotten(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Namespaced: true})
		ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
		if err := c.Set(ctx, ns.Key(), "old"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.InvalidatePrefix(ctx, ns.Prefix()); err != nil {
			t.Fatal(err)
		}
		if v := b.raw(t, ns.Key()); v != nil {
			t.Fatalf("InvalidatePrefix(ns.Prefix()) left %q (key %q, prefix %q)", v[40:], ns.Key(), ns.Prefix())
		}
	})
}

func TestNamespaceTagKeySameProcess(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		p1 := newCache(t, b, &Options[int64]{Namespaced: true})
		ns := MustKeyspace("lists", 1).Namespace(b.prefix+"org", "acme")
		key := ns.Key()
		var db atomic.Int64
		db.Store(1)
		inLoad, resume := make(chan struct{}), make(chan struct{})
		var first atomic.Bool
		load := func(context.Context) (int64, error) {
			v := db.Load()
			if first.CompareAndSwap(false, true) {
				close(inLoad)
				<-resume
			}
			return v, nil
		}
		go func() { _, _ = p1.Get(ctx, key, load) }()
		<-inLoad
		db.Store(2)
		if err := p1.InvalidateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		reached := make(chan struct{})
		var once sync.Once
		p1.hooks = &testHooks{joined: func(string) { once.Do(func() { close(reached) }) }}
		go func() { v, _ := p1.Get(ctx, key, load); got <- v }()
		<-reached // it joined the load in flight, or started its own
		close(resume)
		if v := <-got; v != 2 {
			t.Fatalf("same-process Get after InvalidateNamespace = v%d, want v2", v)
		}
	})
}

// countReads is a client that counts the reads a Cache sends (GET, and
// MGET, which coalesced reads use).
type countReads struct {
	*redis.Client
	n atomic.Int64
}

func (c *countReads) Get(ctx context.Context, key string) *redis.StringCmd {
	c.n.Add(1)
	return c.Client.Get(ctx, key)
}

func (c *countReads) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	c.n.Add(1)
	return c.Client.MGet(ctx, keys...)
}

// TestJoinWithoutRead: Gets that begin while this process loads their key
// join that load without reading Redis, and the load's fill, which landed
// after they began, vouches for its answer, so they read nothing after it
// either: 20 Gets, no read. The load of a key invalidated meanwhile is not
// vouched for (its fill fails), and the Gets that began after the
// invalidation returned load again rather than take it.
func TestJoinWithoutRead(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &countReads{Client: b.client(t)}
		c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 2 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		other := newCache[string](t, b, nil)
		const joiners = 20
		run := func(key string, invalidate bool) (leader string, got []string, reads int64) {
			inLoad, resume := make(chan struct{}), make(chan struct{})
			lead := make(chan string, 1)
			go func() {
				v, _ := c.Get(ctx, key, func(context.Context) (string, error) { close(inLoad); <-resume; return "old", nil })
				lead <- v
			}()
			<-inLoad
			if invalidate {
				if _, err := other.Invalidate(ctx, key); err != nil {
					t.Fatal(err)
				}
			}
			coalesced, r0 := c.Stats().Coalesced, rdb.n.Load()
			out := make(chan string, joiners)
			for range joiners {
				go func() {
					v, err := c.Get(ctx, key, func(context.Context) (string, error) { return "new", nil })
					if err != nil {
						v = err.Error()
					}
					out <- v
				}()
			}
			waitFor(t, "every Get to join the load", func() bool { return c.Stats().Coalesced >= coalesced+joiners })
			close(resume)
			for range joiners {
				got = append(got, <-out)
			}
			return <-lead, got, rdb.n.Load() - r0
		}

		_, got, before := run(b.key("plain"), false)
		for _, v := range got {
			if v != "old" {
				t.Fatalf("a joiner returned %q, want the load's %q", v, "old")
			}
		}
		if before != 0 {
			t.Errorf("%d reads by 20 Gets that joined a load under way, want 0", before)
		}

		_, got, _ = run(b.key("invalidated"), true)
		for _, v := range got {
			if v != "new" {
				t.Fatalf("a Get that began after the invalidation returned returned %q, want %q (loaded again)", v, "new")
			}
		}
	})
}
