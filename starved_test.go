package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

func TestLate(t *testing.T) {
	budget := 50 * time.Millisecond
	timeout := fmt.Errorf("read: %w", context.DeadlineExceeded)
	for _, tc := range []struct {
		name    string
		err     error
		overdue time.Duration // how long ago the deadline was
		starved bool
	}{
		{"on time", timeout, 2 * time.Millisecond, false},
		{"a little late", timeout, lateBy(budget) / 2, false},
		{"frozen past it", timeout, 3 * lateBy(budget), true},
		{"not a timeout", errors.New("connection refused"), time.Second, false},
		{"no error", nil, time.Second, false},
	} {
		got := late(tc.err, time.Now().Add(-tc.overdue), budget, true)
		if starved(got) != tc.starved || !errors.Is(got, tc.err) {
			t.Errorf("%s: late = %v, want starved %v and the error kept", tc.name, got, tc.starved)
		}
	}
	// A socket timeout is the command's deadline only on a client that puts
	// it there; the context's always is.
	sock := &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}
	if starved(late(sock, time.Now().Add(-time.Second), budget, false)) || !starved(late(sock, time.Now().Add(-time.Second), budget, true)) ||
		!starved(late(timeout, time.Now().Add(-time.Second), budget, false)) {
		t.Error("late: a socket timeout is the command's own only with socket deadlines")
	}
	if lateBy(4*time.Millisecond) != 10*time.Millisecond || lateBy(time.Second) != 500*time.Millisecond {
		t.Error("lateBy: half the budget, at least 10ms")
	}
}

// frozenReads plays a process frozen while its reads are in flight (a CPU
// quota's throttling): each GET and MGET notices its deadline only lateness
// after it passed, as a goroutine does that gets the CPU back then, though
// Redis answered. With lateness 0 it plays a slow Redis instead: the
// deadline is noticed on time.
type frozenReads struct {
	*redis.Client
	lateness time.Duration
	reads    atomic.Int64
}

func (f *frozenReads) freeze(ctx context.Context) error {
	f.reads.Add(1)
	dl, ok := ctx.Deadline()
	if !ok {
		return errors.New("frozenReads: a read without a deadline")
	}
	time.Sleep(time.Until(dl) + f.lateness)
	return context.DeadlineExceeded
}

func (f *frozenReads) Get(ctx context.Context, key string) *redis.StringCmd {
	cmd := redis.NewStringCmd(ctx, "get", key)
	cmd.SetErr(f.freeze(ctx))
	return cmd
}

func (f *frozenReads) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	cmd := redis.NewSliceCmd(ctx, "mget")
	cmd.SetErr(f.freeze(ctx))
	return cmd
}

// TestStarvedReadWaitsForTheHolder: a first read whose timeout this process
// noticed late is not a Redis failure. Another process holds the key's
// lease; the Get goes on to the lease round, finds that lease and waits for
// its fill instead of loading: no load, no RedisErrors, no breaker opening
// however often it happens, and the timeouts are counted in Starved. The
// control, a slow Redis (the same timeouts noticed on time), makes every
// Get load without Redis and opens the breaker.
func TestStarvedReadWaitsForTheHolder(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		for _, tc := range []struct {
			name     string
			lateness time.Duration
			starved  bool
		}{
			{"frozen process", 150 * time.Millisecond, true},
			{"slow Redis (control)", 0, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := context.Background()
				rdb := &frozenReads{Client: b.client(t), lateness: tc.lateness}
				c, err := New[string](rdb, &Options[string]{Name: "starved", NoReadCoalescing: true, PollMin: 5 * time.Millisecond, PollMax: 20 * time.Millisecond,
					Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerFailures: 3, RedisTimePerGet: 2 * time.Second}})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = c.Close() })
				var loads atomic.Int64
				load := func(context.Context) (string, error) { loads.Add(1); return "loaded", nil }
				other := b.client(t)
				var fills sync.WaitGroup
				defer fills.Wait()
				for i := range 4 { // past BreakerFailures
					key := b.key(fmt.Sprintf("held-%v-%d", tc.starved, i))
					tok := newToken()
					if held, _, err := acquire(ctx, other, key, tok, time.Minute); err != nil || !held {
						t.Fatalf("the other holder's lease: %v %v", held, err)
					}
					fills.Go(func() { // the other process fills 300ms later
						time.Sleep(300 * time.Millisecond)
						entry := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatJSON, Token: tok,
							SoftExpiry: time.Now().Add(time.Minute).UnixMilli(), Payload: []byte(`"filled"`)})
						_, _ = fill(context.Background(), other, key, "", tok, entry, time.Minute, time.Minute)
					})
					v, err := c.Get(ctx, key, load)
					if err != nil {
						t.Fatal(err)
					}
					if tc.starved && v != "filled" {
						t.Fatalf("Get %d = %q; want the holder's fill", i, v)
					}
				}
				s := c.Stats()
				if tc.starved {
					if loads.Load() != 0 || s.RedisErrors != 0 || s.BreakerOpens != 0 || s.Starved < 4 {
						t.Fatalf("%d loads, stats %+v; want no load, no Redis error, no breaker opening, 4 or more starved", loads.Load(), s)
					}
					return
				}
				if loads.Load() != 4 || s.RedisErrors == 0 || s.BreakerOpens == 0 || s.Starved != 0 {
					t.Fatalf("control: %d loads, stats %+v; want 4 loads without Redis, Redis errors and the breaker open", loads.Load(), s)
				}
			})
		}
	})
}

// TestBlackHoleWithoutContextDeadlines: on a client without
// ContextTimeoutEnabled (go-redis's default) the socket waits for the
// client's ReadTimeout, not the command's budget, so a black-holed Redis
// answers every read long after its budget ended. That is Redis failing,
// not this process starving: the breaker opens and Starved stays 0.
func TestBlackHoleWithoutContextDeadlines(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		open  []net.Conn
		conns sync.WaitGroup
	)
	accepted := make(chan struct{})
	go func() { // accept, read, never answer
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			conns.Go(func() { _, _ = io.Copy(io.Discard, c) })
		}
	}()
	t.Cleanup(func() { // after the client and the cache are closed
		_ = ln.Close()
		<-accepted // no more conns.Go from here
		mu.Lock()
		for _, c := range open {
			_ = c.Close()
		}
		mu.Unlock()
		conns.Wait()
	})
	rdb := redis.NewClient(&redis.Options{Addr: ln.Addr().String(), ReadTimeout: 300 * time.Millisecond, MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := New[string](rdb, &Options[string]{Name: "black-hole", NoReadCoalescing: true,
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerFailures: 3}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	for i := range 6 {
		if v, err := c.Get(context.Background(), fmt.Sprintf("k%d", i), func(context.Context) (string, error) { return "v", nil }); err != nil || v != "v" {
			t.Fatalf("Get %d = %q, %v; want the loader's value", i, v, err)
		}
	}
	if s := c.Stats(); s.BreakerOpens == 0 || s.Starved != 0 {
		t.Fatalf("stats %+v; want the breaker open and nothing counted as starved", s)
	}
}

// stallScripts plays a Redis whose scripts time out (noticed on time) while
// slow is set; reads and everything else answer.
// With lost set, a script runs but its reply is lost the same way.
type stallScripts struct {
	*redis.Client
	slow, lost atomic.Bool
	timedOut   atomic.Int64
}

func (s *stallScripts) stall(ctx context.Context, run func() *redis.Cmd) *redis.Cmd {
	s.timedOut.Add(1)
	cmd := redis.NewCmd(ctx)
	if s.lost.Load() {
		run()
	}
	if dl, ok := ctx.Deadline(); ok {
		time.Sleep(time.Until(dl))
	}
	cmd.SetErr(context.DeadlineExceeded)
	return cmd
}

func (s *stallScripts) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	run := func() *redis.Cmd { return s.Client.EvalSha(ctx, sha, keys, args...) }
	if s.slow.Load() || s.lost.Load() {
		return s.stall(ctx, run)
	}
	return run()
}

func (s *stallScripts) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	run := func() *redis.Cmd { return s.Client.Eval(ctx, script, keys, args...) }
	if s.slow.Load() || s.lost.Load() {
		return s.stall(ctx, run)
	}
	return run()
}

// TestWaiterKeepsWaitingThroughTimeouts: a Get waits for another process's
// lease; then its lease rounds time out, on time, for a while (a slow
// Redis, not a starved process). Having seen the holder, it keeps waiting
// and takes the holder's fill, rather than loading on its own.
func TestWaiterKeepsWaitingThroughTimeouts(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &stallScripts{Client: b.client(t)}
		c := waiterCache(t, rdb, "slowrounds", 0, 10*time.Second)
		other := b.client(t)
		key := b.key("held")
		tok := newToken()
		if held, _, err := acquire(ctx, other, key, tok, time.Minute); err != nil || !held {
			t.Fatalf("the other holder's lease: %v %v", held, err)
		}
		var loads atomic.Int64
		got := getLater(ctx, c, key, func(context.Context) (string, error) { loads.Add(1); return "loaded", nil })
		waitFor(t, "the Get to wait on the lease", func() bool { return c.Stats().LeaseContended == 1 })
		rdb.slow.Store(true)
		waitFor(t, "two of its lease rounds to time out", func() bool { return rdb.timedOut.Load() >= 2 })
		rdb.slow.Store(false)
		entry := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatJSON, Token: tok,
			SoftExpiry: time.Now().Add(time.Minute).UnixMilli(), Payload: []byte(`"filled"`)})
		if ok, err := fill(ctx, other, key, "", tok, entry, time.Minute, time.Minute); err != nil || !ok {
			t.Fatalf("the holder's fill: %v %v", ok, err)
		}
		if v := <-got; v != "filled" || loads.Load() != 0 {
			t.Fatalf("the waiter returned %q after %d loads; want the holder's fill and no load", v, loads.Load())
		}
		if s := c.Stats(); s.RedisErrors == 0 {
			t.Errorf("RedisErrors %d; want the timed-out rounds counted", s.RedisErrors)
		}
	})
}

// TestTimedOutRoundReleasesItsLease: the holder dies; the waiter's next
// lease rounds take its lapsed lease but their replies are lost (time
// out), so the waiter does not know it holds it. When it gives up on Redis
// (its Redis time spent) and loads on its own, it releases that lease,
// rather than leave other processes waiting for its LeaseTTL (a minute
// here).
func TestTimedOutRoundReleasesItsLease(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &stallScripts{Client: b.client(t)}
		c := waiterCache(t, rdb, "lostrounds", time.Minute, 300*time.Millisecond)
		other := b.client(t)
		key := b.key("abandoned")
		if held, _, err := acquire(ctx, other, key, newToken(), 200*time.Millisecond); err != nil || !held {
			t.Fatalf("the dying holder's lease: %v %v", held, err)
		}
		got := getLater(ctx, c, key, func(context.Context) (string, error) { return "loaded", nil })
		waitFor(t, "the Get to wait on the lease", func() bool { return c.Stats().LeaseContended == 1 })
		rdb.lost.Store(true)
		if v := <-got; v != "loaded" {
			t.Fatalf("Get = %q, want the loader's value once its Redis time is spent", v)
		}
		rdb.lost.Store(false)
		b.advance(250 * time.Millisecond) // the dying holder's lease is past its TTL either way
		waitFor(t, "the lease the waiter may have taken to be released", func() bool {
			n, err := other.Exists(ctx, key).Result()
			return err == nil && n == 0
		})
	})
}

// heldUpScripts: while armed, the next script first lets `before` run
// (the holder's fill and an invalidation landing ahead of it in Redis),
// then runs, then its reply is lost (timeout).
type heldUpScripts struct {
	*redis.Client
	armed  atomic.Bool
	before func()
	after  func()
	fired  atomic.Int64
}

func (s *heldUpScripts) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	if s.armed.CompareAndSwap(true, false) {
		s.fired.Add(1)
		s.before()
		s.Client.EvalSha(context.WithoutCancel(ctx), sha, keys, args...)
		s.after()
		cmd := redis.NewCmd(ctx)
		if dl, ok := ctx.Deadline(); ok {
			time.Sleep(time.Until(dl))
		}
		cmd.SetErr(context.DeadlineExceeded)
		return cmd
	}
	return s.Client.EvalSha(ctx, sha, keys, args...)
}

// TestDeliveredAnswerReleasesUnsureLease: a waiter's lease round is held
// up in Redis behind the holder's fill and another process's Invalidate,
// so it finds the key empty and takes the lease, and its reply is lost;
// then the holder's wake message answers the waiter. The lease the waiter
// took without knowing it must be released, or every Get of the key, in
// every process, waits for it to expire (LeaseTTL, a minute here).
func TestDeliveredAnswerReleasesUnsureLease(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		rdb := &heldUpScripts{Client: b.client(t)}
		c := waiterCache(t, rdb, "unsure", time.Minute, 10*time.Second)
		other := b.client(t)
		key := b.key("k")
		tok, proof := newLease()
		if held, _, err := acquire(ctx, other, key, tok, time.Minute); err != nil || !held {
			t.Fatalf("holder: %v %v", held, err)
		}
		waitFor(t, "wake live", func() bool { return c.wake != nil && c.wake.live.Load() })
		entry := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatJSON, Token: tok,
			SoftExpiry: time.Now().Add(time.Minute).UnixMilli(), Payload: []byte(`"filled"`)})
		rdb.before = func() {
			if ok, err := fill(ctx, other, key, "", tok, entry, time.Minute, time.Minute); err != nil || !ok {
				t.Errorf("fill: %v %v", ok, err)
			}
			other.Del(ctx, key) // another process's Invalidate
		}
		rdb.after = func() { // the fill's wake message, read by the waiter after the round
			other.Publish(ctx, wakeChannelPrefix+"unsure", wakeMessage(key, &proof, entry))
		}
		got := getLater(ctx, c, key, func(context.Context) (string, error) { return "loaded", nil })
		waitFor(t, "the Get to wait", func() bool { return c.Stats().LeaseContended == 1 })
		rdb.armed.Store(true)
		if v := <-got; v != "filled" || rdb.fired.Load() != 1 {
			t.Fatalf("Get = %q after %d held-up rounds; want the holder's fill after one", v, rdb.fired.Load())
		}
		waitFor(t, "the lease the Get took without knowing to be released", func() bool {
			b2, err := other.Get(ctx, key).Bytes()
			var e envelope.Entry
			return err == redis.Nil || (err == nil && (envelope.Decode(b2, &e) != nil || e.Kind != envelope.Lease))
		})
	})
}

// waiterCache is the cache of the lease-round tests: no read coalescing,
// short polls, a 50ms budget, a breaker that stays out of the way, leases
// of leaseTTL (0: the default) and redisTime per Get.
func waiterCache(t *testing.T, rdb Redis, name string, leaseTTL, redisTime time.Duration) *Cache[string] {
	t.Helper()
	c, err := New[string](rdb, &Options[string]{Name: name, NoReadCoalescing: true, LeaseTTL: leaseTTL,
		PollMin: 5 * time.Millisecond, PollMax: 20 * time.Millisecond,
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerFailures: 100, RedisTimePerGet: redisTime}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// getLater runs c.Get in the background and sends its answer, or its
// error's text.
func getLater(ctx context.Context, c *Cache[string], key string, load Loader[string]) <-chan string {
	got := make(chan string, 1)
	go func() {
		v, err := c.Get(ctx, key, load)
		if err != nil {
			v = err.Error()
		}
		got <- v
	}()
	return got
}
