package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// pageTags is an Options.Tags for keys "<prefix>page:<org>:<user>:<n>":
// each page carries the tags of its org and of its user.
func pageTags(prefix string) func(string) []string {
	return func(key string) []string {
		parts := strings.Split(strings.TrimPrefix(key, prefix), ":")
		if len(parts) != 4 || parts[0] != "page" {
			return nil
		}
		return []string{prefix + "org:" + parts[1], prefix + "user:" + parts[2]}
	}
}

// loadsOf counts loads per key and answers "<key>@<version>".
type loadsOf struct {
	mu      sync.Mutex
	n       map[string]int
	version atomic.Int64
}

func (l *loadsOf) loader(key string) Loader[string] {
	return func(context.Context) (string, error) {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.n == nil {
			l.n = map[string]int{}
		}
		l.n[key]++
		return fmt.Sprintf("%s@%d", key, l.version.Load()), nil
	}
}

// take returns the loads per key since the last take.
func (l *loadsOf) take() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.n
	l.n = nil
	if n == nil {
		n = map[string]int{}
	}
	return n
}

// InvalidateTags reloads exactly the entries that carry the tag, through
// Get, GetMany, Set, SetMany and Peek; a lost tag generation costs a
// reload, not a stale value; Clear reloads everything.
func TestTags(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := newCache(t, b, &Options[string]{Tags: pageTags(b.prefix), Clearable: true, Policy: Policy{TTL: time.Hour}})
		page := func(org, user string, n int) string { return fmt.Sprintf("%spage:%s:%s:%d", b.prefix, org, user, n) }
		p1, p2, p3 := page("a", "x", 1), page("a", "y", 1), page("b", "x", 1)
		var l loadsOf
		getAll := func() map[string]int {
			t.Helper()
			for _, k := range []string{p1, p2, p3} {
				if v, err := c.Get(ctx, k, l.loader(k)); err != nil {
					t.Fatalf("Get %s = %q, %v", k, v, err)
				}
			}
			return l.take()
		}
		expect := func(what string, got map[string]int, want ...string) {
			t.Helper()
			w := map[string]int{}
			for _, k := range want {
				w[k]++
			}
			if fmt.Sprint(got) != fmt.Sprint(w) {
				t.Fatalf("%s: loads %v, want %v", what, got, w)
			}
		}
		expect("first Gets", getAll(), p1, p2, p3)
		expect("hits", getAll())
		if err := c.InvalidateTags(ctx, b.prefix+"org:a"); err != nil {
			t.Fatal(err)
		}
		expect("after org:a", getAll(), p1, p2)
		if err := c.InvalidateTags(ctx, b.prefix+"user:x"); err != nil {
			t.Fatal(err)
		}
		expect("after user:x", getAll(), p1, p3)
		if err := c.InvalidateTags(ctx, b.prefix+"org:zzz"); err != nil {
			t.Fatal(err)
		}
		expect("after a tag nothing carries", getAll())

		// A lost generation key: the entries carrying it reload once.
		raw := b.client(t)
		if n := raw.Del(ctx, c.tagKey(b.prefix+"org:b")).Val(); n != 1 {
			t.Fatalf("DEL of org:b's generation removed %d keys", n)
		}
		expect("after org:b's generation was lost", getAll(), p3)
		expect("hits again", getAll())

		// GetMany agrees.
		if err := c.InvalidateTags(ctx, b.prefix+"user:y"); err != nil {
			t.Fatal(err)
		}
		got, err := GetMany(ctx, c, []string{p1, p2, p3}, func(k string) string { return k },
			func(_ context.Context, ids []string) (map[string]string, error) {
				m := map[string]string{}
				for _, k := range ids {
					m[k], _ = l.loader(k)(ctx)
				}
				return m, nil
			})
		if err != nil || len(got) != 3 {
			t.Fatal(got, err)
		}
		expect("GetMany after user:y", l.take(), p2)

		// Set and SetMany stamp their entries with the tags' generations.
		if err := c.Set(ctx, p1, "set"); err != nil {
			t.Fatal(err)
		}
		if v, err := c.Get(ctx, p1, noLoad); err != nil || v != "set" {
			t.Fatalf("Get after Set = %q, %v", v, err)
		}
		if n, err := c.SetMany(ctx, map[string]string{p2: "warm2", p3: "warm3"}); n != 2 || err != nil {
			t.Fatalf("SetMany = %d, %v", n, err)
		}
		if p, err := c.Peek(ctx, p2); err != nil || p.State != "fresh" || p.Value != "warm2" {
			t.Fatalf("Peek after SetMany = %+v, %v", p, err)
		}
		if err := c.InvalidateTags(ctx, b.prefix+"org:a"); err != nil {
			t.Fatal(err)
		}
		if p, err := c.Peek(ctx, p2); err != nil || p.State != "absent" {
			t.Fatalf("Peek of an entry whose tag moved = %+v, %v; want absent", p, err)
		}
		expect("after Set, SetMany and org:a", getAll(), p1, p2)

		// Clear: everything reloads, with one write.
		if err := c.Clear(ctx); err != nil {
			t.Fatal(err)
		}
		expect("after Clear", getAll(), p1, p2, p3)
		expect("hits after Clear", getAll())
	})
}

// Wrong uses of tags fail before any I/O and load nothing.
func TestTagsInvalid(t *testing.T) {
	b := &backend{name: "miniredis", addr: miniredisRun(t).Addr(), prefix: uniquePrefix()}
	ctx := context.Background()
	if _, err := New[string](b.client(t), &Options[string]{Namespaced: true, Tags: pageTags("")}); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("Namespaced with Tags: %v", err)
	}
	if _, err := New[string](b.client(t), &Options[string]{Namespaced: true, Clearable: true}); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("Namespaced with Clearable: %v", err)
	}
	plain := newCache[string](t, b, nil)
	if err := plain.InvalidateTags(ctx, "x"); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("InvalidateTags without Tags: %v", err)
	}
	if err := plain.Clear(ctx); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("Clear without Clearable: %v", err)
	}
	tags := map[string][]string{
		"empty":    {"ok", ""},
		"long":     {strings.Repeat("t", 2000)},
		"too-many": strings.Split(strings.Repeat("t,", maxTags), ","), // maxTags+1
	}
	c := newCache(t, b, &Options[string]{Tags: func(key string) []string {
		if key == "panics" {
			panic("tags")
		}
		return tags[key]
	}})
	var loads counter
	for key := range tags {
		if _, err := c.Get(ctx, key, loads.load("v", 0)); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Get %s: %v, want ErrInvalidKey", key, err)
		}
		if err := c.Set(ctx, key, "v"); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Set %s: %v, want ErrInvalidKey", key, err)
		}
	}
	var pe *PanicError
	if _, err := c.Get(ctx, "panics", loads.load("v", 0)); !errors.As(err, &pe) {
		t.Errorf("Get with a panicking Tags: %v, want a *PanicError", err)
	}
	if _, err := GetMany(ctx, c, []string{"empty", "fine"}, func(k string) string { return k },
		func(context.Context, []string) (map[string]string, error) { return map[string]string{"fine": "v"}, nil }); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("GetMany with an invalid tag: %v", err)
	}
	if n := loads.calls.Load(); n != 0 {
		t.Errorf("%d loads for keys with invalid tags", n)
	}
	if err := c.InvalidateTags(ctx, "ok", ""); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("InvalidateTags with an empty tag: %v", err)
	}
}

// A tag invalidated while a load is in flight: its fill lands dead, and a
// Get that starts after InvalidateTags returned, in this process or
// another, does not return the old load's value. In the process that
// invalidated, it does not even wait for that load.
func TestTagsLoadInFlight(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		opts := func() *Options[string] {
			return &Options[string]{Tags: pageTags(b.prefix), Policy: Policy{TTL: time.Hour}}
		}
		c1, c2 := newCache(t, b, opts()), newCache(t, b, opts())
		joins := make(chan string, 64)
		c1.hooks = &testHooks{joined: func(key string) { joins <- key }}
		joined := func(key string) { // a Get of key joined a flight
			for k := range joins {
				if k == key {
					return
				}
			}
		}
		var version atomic.Int64
		fast := func(context.Context) (string, error) { return fmt.Sprint(version.Load()), nil }
		// slowGet starts a Get on c whose load blocks until release closes.
		slowGet := func(c *Cache[string], key string) (release chan struct{}, result chan string) {
			started := make(chan struct{})
			release, result = make(chan struct{}), make(chan string, 1)
			go func() {
				v, _ := c.Get(ctx, key, func(context.Context) (string, error) {
					v := version.Load()
					close(started)
					<-release
					return fmt.Sprint(v), nil
				})
				result <- v
			}()
			<-started
			joined(key)
			return release, result
		}
		get := func(c *Cache[string], key string) chan string {
			out := make(chan string, 1)
			go func() {
				v, err := c.Get(ctx, key, fast)
				if err != nil {
					t.Error(err)
				}
				out <- v
			}()
			return out
		}
		within := func(what string, ch chan string, want string) {
			t.Helper()
			select {
			case v := <-ch:
				if v != want {
					t.Fatalf("%s = %q; want %q", what, v, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s did not return", what)
			}
		}

		// Invalidated by another process, which reads nothing: the old
		// load's fill lands (no script can check a tag in another slot),
		// and the Get that joined that load must not take its answer.
		key := b.prefix + "page:c:z:1"
		release, first := slowGet(c1, key)
		version.Store(1)
		if err := c2.InvalidateTags(ctx, b.prefix+"org:c"); err != nil {
			t.Fatal(err)
		}
		again := get(c1, key)
		joined(key) // it joined the old load
		close(release)
		within("the old load's own Get", first, "0")
		within("Get in the loading process after InvalidateTags", again, "1")

		// Invalidated by another process, which reads the key next.
		version.Store(0)
		key = b.prefix + "page:a:x:1"
		release, first = slowGet(c1, key)
		version.Store(1)
		if err := c2.InvalidateTags(ctx, b.prefix+"user:x"); err != nil {
			t.Fatal(err)
		}
		// That process's read finds the old load's lease stamped with the
		// old generation, and takes it over.
		within("Get in another process after InvalidateTags", get(c2, key), "1")
		// This process joins its own load, then finds its answer dead.
		again = get(c1, key)
		joined(key)
		close(release)
		within("the old load's own Get", first, "0")
		within("Get in the loading process after InvalidateTags", again, "1")

		// Invalidated by the loading process itself: a later Get does not
		// join the old load.
		key = b.prefix + "page:b:y:1"
		release, first = slowGet(c1, key)
		version.Store(2)
		if err := c1.InvalidateTags(ctx, b.prefix+"org:b"); err != nil {
			t.Fatal(err)
		}
		within("Get after this process's InvalidateTags", get(c1, key), "2")
		close(release)
		within("the old load's own Get", first, "1")
		for _, c := range []*Cache[string]{c1, c2} {
			if v, err := c.Get(ctx, key, noLoad); err != nil || v != "2" {
				t.Fatalf("Get after the old load finished = %q, %v; want 2", v, err)
			}
		}
	})
}

// Local tiers drop tagged entries on InvalidateTags and Clear, in every
// process on the bus.
func TestTagsLocalTier(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		opts := func() *Options[string] {
			return &Options[string]{Tags: pageTags(b.prefix), Clearable: true, Policy: Policy{TTL: time.Hour},
				Local: &LocalOptions{TTL: time.Hour, Channel: b.prefix + "bus"}}
		}
		c1, c2 := newCache(t, b, opts()), newCache(t, b, opts())
		for _, c := range []*Cache[string]{c1, c2} {
			if err := c.WaitLocal(ctx); err != nil {
				t.Fatal(err)
			}
		}
		key := b.prefix + "page:a:x:1"
		var version atomic.Int64
		load := func(context.Context) (string, error) { return fmt.Sprint(version.Load()), nil }
		for _, c := range []*Cache[string]{c1, c2} {
			if v, err := c.Get(ctx, key, load); err != nil || v != "0" {
				t.Fatal(v, err)
			}
			if v, err := c.Get(ctx, key, noLoad); err != nil || v != "0" {
				t.Fatal(v, err)
			}
		}
		for i, bump := range []func() error{
			func() error { return c1.InvalidateTags(ctx, b.prefix+"org:a") },
			func() error { return c1.Clear(ctx) },
		} {
			version.Add(1)
			want := fmt.Sprint(version.Load())
			if err := bump(); err != nil {
				t.Fatal(err)
			}
			if v, err := c1.Get(ctx, key, load); err != nil || v != want {
				t.Fatalf("bump %d: the invalidating process's Get = %q, %v; want %s", i, v, err, want)
			}
			waitFor(t, "the other process's local tier to drop the tagged entry", func() bool {
				v, err := c2.Get(ctx, key, load)
				return err == nil && v == want
			})
		}
	})
}

// InvalidateTags while Redis is down: the error is returned, each tag's
// invalidation is queued, this process's Gets of the entries carrying
// them load from the source meanwhile, and once Redis is back the retry
// lands and the entries reload.
func TestTagsRedisDown(t *testing.T) {
	mr := miniredisRun(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	ctx := context.Background()
	c := newCache(t, b, &Options[string]{Tags: pageTags(b.prefix), Policy: Policy{TTL: time.Hour},
		Degradation: Degradation{OpTimeout: 200 * time.Millisecond, NoBreaker: true}})
	key, other := b.prefix+"page:a:x:1", b.prefix+"page:b:y:1"
	var l loadsOf
	for _, k := range []string{key, other} {
		if _, err := c.Get(ctx, k, l.loader(k)); err != nil {
			t.Fatal(err)
		}
	}
	l.take()
	mr.Close()
	err := c.InvalidateTags(ctx, b.prefix+"org:a", b.prefix+"user:x")
	var oe *OpError
	if !errors.As(err, &oe) {
		t.Fatalf("InvalidateTags with Redis down = %v, want an *OpError", err)
	}
	vk, _ := c.checkKey(key)
	if !c.retries.covers(key, vk) {
		t.Fatal("the failed tag invalidation is not queued")
	}
	ovk, _ := c.checkKey(other)
	if c.retries.covers(other, ovk) {
		t.Fatal("a key without the tags is covered by their queued invalidation")
	}
	if err := mr.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the queued tag invalidations to land", func() bool { return !c.retries.covers(key, vk) })
	if _, err := c.Get(ctx, key, l.loader(key)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, other, l.loader(other)); err != nil {
		t.Fatal(err)
	}
	if got := l.take(); got[key] != 1 || got[other] != 0 {
		t.Fatalf("loads after the retry landed: %v; want %s reloaded, %s a hit", got, key, other)
	}
}
