package cacheaside

import (
	"context"
	"fmt"
	"os"
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
		live := func(c *Cache[string]) bool { return c.local.live.Load() && c.wake.live.Load() }
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
		if _, err := other.Invalidate(ctx, key); err != nil {
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

// probe is a subscriber that records its callbacks.
type probe struct {
	s          *subscriber
	ups, downs atomic.Int64
	msgs       chan string
}

func newProbe(ch string, onMsg func(string)) *probe {
	p := &probe{msgs: make(chan string, 16)}
	p.s = &subscriber{channel: ch, hc: time.Second,
		up:   func() { p.ups.Add(1) },
		down: func(error, bool) { p.downs.Add(1) },
		message: func(m string) {
			if onMsg != nil {
				onMsg(m)
			}
			p.msgs <- m
		}}
	return p
}

// parkHub registers a subscriber on channel y whose callback holds the
// hub's goroutine on the message "block" until the returned gate closes.
func parkHub(t *testing.T, rdb *redis.Client, y string) (h *hub, p0 *probe, gate chan struct{}) {
	t.Helper()
	gate, entered := make(chan struct{}), make(chan struct{})
	p0 = newProbe(y, func(m string) {
		if m == "block" {
			close(entered)
			<-gate
		}
	})
	h = joinHub(rdb)
	h.add(p0.s)
	waitFor(t, "the first subscriber up", func() bool { return p0.ups.Load() == 1 })
	rdb.Publish(context.Background(), y, "block")
	<-entered
	return h, p0, gate
}

// TestHubLateSubscribeReply: a channel's only subscriber comes and goes
// while the hub's goroutine is busy, so the "subscribe" reply arrives after
// the UNSUBSCRIBE was sent. That reply must not confirm the channel: the
// next subscriber of it must get a SUBSCRIBE of its own, and hear its
// messages, rather than be told up on a channel the server no longer
// sends.
func TestHubLateSubscribeReply(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := b.client(t)
		x := b.key("X")
		h, p0, gate := parkHub(t, rdb, b.key("Y"))
		p1 := newProbe(x, nil)
		h.add(p1.s) // SUBSCRIBE x
		removed := make(chan struct{})
		go func() { h.remove(p1.s); close(removed) }() // UNSUBSCRIBE x, then waits for the busy callback
		waitFor(t, "the UNSUBSCRIBE", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return h.pending[x] == 2 })
		close(gate)
		<-removed
		waitFor(t, "both replies", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return h.pending[x] == 0 })

		p2 := newProbe(x, nil)
		h.add(p2.s)
		waitFor(t, "the second subscriber of x up", func() bool { return p2.ups.Load() == 1 })
		rdb.Publish(ctx, x, "invalidate")
		select {
		case <-p2.msgs:
		case <-time.After(5 * time.Second):
			t.Errorf("the subscriber of %s was told up, but its message never came (%d subscribers on the server)", x, rdb.PubSubNumSub(ctx, x).Val()[x])
		}
		h.remove(p2.s)
		h.remove(p0.s)
		leaveHub(h)
	})
}

// TestHubWriteFailureIsLoss: the subscription connection is killed while
// the hub's goroutine is busy, and a message is published meanwhile. A
// SUBSCRIBE written from another goroutine then fails, and go-redis would
// reconnect inside the PubSub without a word; the hub closes it instead,
// so every subscriber hears down (the missed message is why), and all of
// them are up again on the next connection.
func TestHubWriteFailureIsLoss(t *testing.T) {
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		t.Skipf("kills a connection with CLIENT KILL: set %s", envRedisAddr)
	}
	b := &backend{addr: addr, prefix: uniquePrefix()}
	ctx := context.Background()
	rdb := b.client(t)
	y := b.key("Y")
	h, p0, gate := parkHub(t, rdb, y)
	admin := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { _ = admin.Close() })
	if err := admin.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	admin.Publish(ctx, y, "lost while down")
	var later []*probe
	for _, ch := range []string{"X", "Z"} { // the first write may still be accepted; the second fails
		time.Sleep(50 * time.Millisecond)
		p := newProbe(b.key(ch), nil)
		h.add(p.s)
		later = append(later, p)
	}
	close(gate)
	waitFor(t, "down after the lost connection", func() bool { return p0.downs.Load() > 0 })
	waitFor(t, "every subscriber up on the next connection", func() bool {
		return p0.ups.Load() == 2 && later[0].ups.Load() > 0 && later[1].ups.Load() > 0
	})
	for _, p := range append(later, p0) {
		h.remove(p.s)
	}
	leaveHub(h)
}
