package cacheaside

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// countSubs is a client that counts the subscription connections it opens.
type countSubs struct {
	*redis.Client
	opened atomic.Int64
}

func (c *countSubs) Subscribe(ctx context.Context, channels ...string) *redis.PubSub {
	c.opened.Add(1)
	return c.Client.Subscribe(ctx, channels...)
}

// TestOneSubscriptionPerClient: ten Caches with a local tier on one client
// hold one subscription connection among them, for their twenty channels.
// Each still hears its own channels: a fill wakes the waiter of one cache,
// an Invalidate from another process drops another cache's local entry. A
// cache that comes later joins the live connection (and is up at once);
// those that close leave the others live; the last one to close ends it.
func TestOneSubscriptionPerClient(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		cs := &countSubs{Client: b.client(t)}
		opts := func(i int) *Options[string] {
			return &Options[string]{Name: fmt.Sprintf("%sc%d", b.prefix, i), Local: &LocalOptions{TTL: time.Hour},
				Degradation: Degradation{OpTimeout: 2 * time.Second}}
		}
		live := func(c *Cache[string]) bool { return c.LocalLive() && c.wake.live.Load() }
		var caches []*Cache[string]
		for i := range 10 {
			c, err := New[string](cs, opts(i))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			caches = append(caches, c)
		}
		for _, c := range caches {
			waitFor(t, "every cache's channels", func() bool { return live(c) })
		}
		if n := cs.opened.Load(); n != 1 {
			t.Fatalf("%d subscription connections for 10 caches on one client, want 1", n)
		}

		// The bus of cache 3 works: another process's Invalidate drops its
		// local entry.
		key := b.key("shared")
		load := func(v string) func(context.Context) (string, error) {
			return func(context.Context) (string, error) { return v, nil }
		}
		if v, _ := caches[3].Get(ctx, key, load("old")); v != "old" {
			t.Fatalf("first Get = %q", v)
		}
		other := newCache[string](t, b, opts(3))
		if err := other.Invalidate(ctx, key); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "cache 3 to hear the invalidation", func() bool {
			v, _ := caches[3].Get(ctx, key, load("new"))
			return v == "new"
		})

		// Half of them close; the rest stay live on the same connection, and
		// a new cache joins it.
		for _, c := range caches[:5] {
			_ = c.Close()
		}
		late, err := New[string](cs, opts(20))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = late.Close() })
		waitFor(t, "the late cache's channels", func() bool { return live(late) })
		for _, c := range caches[5:] {
			if !live(c) {
				t.Fatalf("cache %s not live after others closed", c.name)
			}
		}
		if n := cs.opened.Load(); n != 1 {
			t.Fatalf("%d subscription connections after caches came and went, want 1", n)
		}

		for _, c := range caches[5:] {
			_ = c.Close()
		}
		_ = late.Close()
		hubs.mu.Lock()
		h := hubs.m[any(cs)]
		hubs.mu.Unlock()
		if h != nil {
			t.Fatalf("the hub outlived its last cache")
		}
	})
}
