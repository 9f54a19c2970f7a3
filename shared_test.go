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

// scriptGate holds the first lease script (EVALSHA or EVAL) until gate is
// closed, on top of gatedRedis's holds on GET and MGET.
type scriptGate struct {
	*gatedRedis
	scripts atomic.Int64
	gate    chan struct{}
}

func (r *scriptGate) hold() {
	if r.scripts.Add(1) == 1 {
		<-r.gate
	}
}

func (r *scriptGate) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	r.hold()
	return r.gatedRedis.EvalSha(ctx, sha, keys, args...)
}

func (r *scriptGate) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	r.hold()
	return r.gatedRedis.Eval(ctx, script, keys, args...)
}

// TestSharedReadParksTheStampede: 200 Gets of one cold key queued behind
// two held reads share one queued read. Until the flight's first lease
// round has answered, only the Get that queued the read has woken (one
// afterRead); the others wake after it, join the flight without a read of
// their own, and all get the one load's value.
func TestSharedReadParksTheStampede(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &scriptGate{gatedRedis: &gatedRedis{Client: b.client(t), gate: make(chan struct{})}, gate: make(chan struct{})}
		c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 2 * time.Second, RedisTimePerGet: 10 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var once sync.Once
		defer once.Do(func() { close(rdb.gate); close(rdb.gatedRedis.gate) }) // before Close, on every way out
		key := b.key("cold")
		var woke atomic.Int64
		c.hooks = &testHooks{afterRead: func(k string) {
			if k == key {
				woke.Add(1)
			}
		}}
		var held sync.WaitGroup
		for i := range 2 { // two direct reads of other keys, held on the wire
			held.Go(func() {
				_, _ = c.Get(ctx, b.key(fmt.Sprint("held", i)), func(context.Context) (string, error) { return "x", nil })
			})
		}
		waitFor(t, "two direct reads", func() bool { return rdb.gets.Load() == 2 })
		for range maxSends { // every send slot taken: the queue is not sent until every Get has joined it
			c.reads.sends <- struct{}{}
		}
		const n = 200
		var loads atomic.Int64
		var stampede sync.WaitGroup
		for range n {
			stampede.Go(func() {
				v, err := c.Get(ctx, key, func(context.Context) (string, error) {
					loads.Add(1)
					return "loaded", nil
				})
				if err != nil || v != "loaded" {
					t.Errorf("Get = %q, %v", v, err)
				}
			})
		}
		var sh *sharedRead
		waitFor(t, "every Get sharing one queued read", func() bool {
			c.reads.mu.Lock()
			defer c.reads.mu.Unlock()
			if r := c.reads.heads[key]; r != nil && r.shared != nil && r.shared.others == n-1 {
				sh = r.shared
				return true
			}
			return false
		})
		for range maxSends {
			<-c.reads.sends
		}
		waitFor(t, "the lease script", func() bool { return rdb.scripts.Load() == 1 })
		select {
		case <-sh.ready:
			t.Fatal("the sharing Gets were let go before the lease round answered")
		default:
		}
		if w := woke.Load(); w != 1 {
			t.Fatalf("%d Gets woke from the read before the lease round answered; want 1", w)
		}
		close(rdb.gate)
		stampede.Wait()
		once.Do(func() { close(rdb.gatedRedis.gate) })
		held.Wait()
		s := c.Stats()
		if loads.Load() != 1 || s.Misses != n+2 || s.Coalesced != n-1 || rdb.mgets.Load() != 1 {
			t.Fatalf("%d loads, %d MGETs, stats %+v; want 1 load, 1 MGET, %d misses (with the two held reads'), %d coalesced", loads.Load(), rdb.mgets.Load(), s, n+2, n-1)
		}
	})
}

// replyGate answers its first MGET only when gate is closed, after the
// read itself has run: a read sent, its reply still on the way.
type replyGate struct {
	*redis.Client
	mgets atomic.Int64
	gate  chan struct{}
}

func (r *replyGate) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	cmd := r.Client.MGet(ctx, keys...)
	if r.mgets.Add(1) == 1 {
		<-r.gate
	}
	return cmd
}

func (r *replyGate) Get(ctx context.Context, key string) *redis.StringCmd {
	if r.mgets.Load() == 0 {
		<-r.gate // the direct reads are held until the test is done
	}
	return r.Client.Get(ctx, key)
}

// TestSentReadIsNotShared: a Get that begins after another Get's queued
// read was sent does not share it, so it cannot be served what that read
// saw before a write and invalidation that returned before the Get began.
func TestSentReadIsNotShared(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &replyGate{Client: b.client(t), gate: make(chan struct{})}
		c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 5 * time.Second, RedisTimePerGet: 10 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var once sync.Once
		open := func() { once.Do(func() { close(rdb.gate) }) }
		defer open() // before Close, on every way out
		key := b.key("k")
		if err := c.Set(ctx, key, "old"); err != nil {
			t.Fatal(err)
		}
		fail := func(context.Context) (string, error) { return "", fmt.Errorf("loader called") }
		var held sync.WaitGroup
		for i := range 2 {
			held.Go(func() { _, _ = c.Get(ctx, b.key(fmt.Sprint("held", i)), fail) })
		}
		waitFor(t, "two direct reads", func() bool { return c.reads.direct.Load() == 2 })
		first := make(chan string, 1)
		go func() {
			v, _ := c.Get(ctx, key, fail)
			first <- v
		}()
		waitFor(t, "the first Get's read sent", func() bool { return rdb.mgets.Load() == 1 })
		if err := c.Set(ctx, key, "new"); err != nil { // the write, after the read saw "old"
			t.Fatal(err)
		}
		second := make(chan string, 1)
		go func() {
			v, _ := c.Get(ctx, key, fail)
			second <- v
		}()
		select {
		case v := <-second:
			if v != "new" {
				t.Fatalf("a Get begun after the write got %q", v)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a Get begun after the read was sent waited for that read")
		}
		open()
		if v := <-first; v != "old" {
			t.Fatalf("the first Get got %q; its read saw old", v)
		}
		held.Wait()
	})
}

// holdSends takes every send slot of c's coalescer, so queued reads stay
// queued, and returns what gives them back.
func holdSends(c *Cache[string]) func() {
	for range maxSends {
		c.reads.sends <- struct{}{}
	}
	return func() {
		for range maxSends {
			<-c.reads.sends
		}
	}
}

// queuedBehind starts two Gets of other keys whose direct reads the gate
// holds, so the next reads are queued.
func queuedBehind(t *testing.T, c *Cache[string], rdb *gatedRedis, b *backend) {
	t.Helper()
	for i := range 2 {
		go func() {
			_, _ = c.Get(context.Background(), b.key(fmt.Sprint("held", i)), func(context.Context) (string, error) { return "x", nil })
		}()
	}
	waitFor(t, "two direct reads", func() bool { return rdb.gets.Load() == 2 })
}

// queuedValue returns a cache whose key holds "v", and whose next reads
// are queued behind two held direct reads (queuedBehind).
func queuedValue(t *testing.T, b *backend) (*Cache[string], string) {
	t.Helper()
	rdb := &gatedRedis{Client: b.client(t)}
	c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 2 * time.Second, RedisTimePerGet: 10 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	key := b.key("k")
	if err := c.Set(context.Background(), key, "v"); err != nil {
		t.Fatal(err)
	}
	rdb.gate = make(chan struct{})
	t.Cleanup(func() { close(rdb.gate) }) // before Close: cleanups run last first
	queuedBehind(t, c, rdb, b)
	return c, key
}

// sharing waits until others Gets share the queued read of key.
func sharing(t *testing.T, c *Cache[string], key string, others int) {
	t.Helper()
	waitFor(t, fmt.Sprint(others, " Gets sharing the queued read"), func() bool {
		c.reads.mu.Lock()
		defer c.reads.mu.Unlock()
		r := c.reads.heads[key]
		return r != nil && (others == 0 || r.shared != nil && r.shared.others == others)
	})
}

// TestSharedReadKeepsItsBound: a Get with a 400ms deadline that shares the
// queued read of a Get without one waits as its own queued read would
// (half its deadline), then goes on with Redis and finds the value; it
// does not wait out its deadline behind the first Get.
func TestSharedReadKeepsItsBound(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c, key := queuedValue(t, b)
		give := holdSends(c)
		defer give()
		load := func(context.Context) (string, error) { return "loaded", nil }
		go func() { _, _ = c.Get(ctx, key, load) }()
		sharing(t, c, key, 0)
		fctx, cancel := context.WithTimeout(ctx, 400*time.Millisecond)
		defer cancel()
		if v, err := c.Get(fctx, key, load); v != "v" || err != nil {
			t.Fatalf("a Get sharing a read that stays queued = %q, %v; want the value, found after its own bound", v, err)
		}
	})
}

// TestSharedReadHeadDeadline: when the Get that queued a read gives up
// first (its deadline), the Gets sharing it are not handed its timeout:
// they wait for the read themselves and count hits.
func TestSharedReadHeadDeadline(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c, key := queuedValue(t, b)
		give := holdSends(c)
		load := func(context.Context) (string, error) { return "loaded", nil }
		hctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		head := make(chan error, 1)
		go func() { _, err := c.Get(hctx, key, load); head <- err }()
		sharing(t, c, key, 0)
		const n = 10
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				if v, err := c.Get(ctx, key, load); v != "v" || err != nil {
					t.Errorf("a Get sharing the read = %q, %v", v, err)
				}
			})
		}
		sharing(t, c, key, n)
		<-head // gave up at its bound, with the read still queued
		give()
		wg.Wait()
		if s := c.Stats(); s.Hits < n {
			t.Fatalf("stats %+v: want the %d Gets that shared the read counted as hits", s, n)
		}
	})
}
