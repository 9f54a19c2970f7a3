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

// The Gets that joined a load are answered when the loader returns, before
// the fill's round trip, if the lease round the load followed vouches for
// them; the leader's own Get returns once the fill has landed; and a Get
// that began after an invalidation removed the lease does not take that
// answer: it waits for the fill, which is refused, and loads again.
func TestJoinersAnsweredBeforeTheFill(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		// Each Get reads on its own: a shared read's Gets join once the
		// leader's lease round has answered, which the leader here waits
		// on them to begin.
		c := newCache(t, b, &Options[int64]{NoReadCoalescing: true})
		other := newCache(t, b, &Options[int64]{}) // another process: its invalidation cannot reach c's flight
		key := b.key("early")
		var db atomic.Int64
		db.Store(1)
		var joins atomic.Int64
		joinersIn := make(chan struct{})
		fillGate := make(chan struct{})
		var openGate sync.Once
		t.Cleanup(func() { openGate.Do(func() { close(fillGate) }) }) // a failed test does not hang Close
		var gated atomic.Bool
		c.hooks = &testHooks{
			joined: func(string) {
				switch joins.Add(1) {
				case 1: // the leader starts its lease round once the joiners are in
					<-joinersIn
				case 6:
					close(joinersIn)
				}
			},
			beforeFill: func(string) {
				if gated.CompareAndSwap(false, true) {
					<-fillGate
				}
			},
		}
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
		get := func() chan int64 {
			ch := make(chan int64, 1)
			go func() {
				v, err := c.Get(ctx, key, load)
				if err != nil {
					t.Error(err)
				}
				ch <- v
			}()
			return ch
		}
		leader := get()
		waitFor(t, "the leader to join", func() bool { return joins.Load() == 1 })
		var joiners []chan int64
		for range 5 { // they begin before the leader's lease round
			joiners = append(joiners, get())
		}
		<-inLoad

		db.Store(2) // a write elsewhere, and its invalidation, which removes the lease
		if _, err := other.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		late := get() // begins after the invalidation returned; skips its read (the flight held the lease)
		waitFor(t, "the late Get to join", func() bool { return joins.Load() == 7 })

		close(resume) // the loader returns 1; the fill waits at the gate
		for i, ch := range joiners {
			select {
			case v := <-ch:
				if v != 1 {
					t.Fatalf("joiner %d got %d, want the load's 1", i, v)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("joiner %d not answered while the fill waits", i)
			}
		}
		select {
		case v := <-leader:
			t.Fatalf("the leader's Get returned %d before its fill", v)
		case v := <-late:
			t.Fatalf("the Get begun after the invalidation returned %d before the fill", v)
		default:
		}
		openGate.Do(func() { close(fillGate) })
		if v := <-leader; v != 1 {
			t.Fatalf("leader got %d, want 1", v)
		}
		if v := <-late; v != 2 {
			t.Fatalf("the Get begun after the invalidation got %d, want 2", v)
		}
	})
}
