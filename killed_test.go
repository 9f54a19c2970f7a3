package cacheaside

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// TestFaultKilledDefaultClient: a client made as most people make it (go-redis
// defaults: MaxRetries 3, DialerRetries 5, with and without
// ContextTimeoutEnabled), a warm key, then redis-server is SIGKILLed. The
// next 50 Gets, each with a 1s deadline and a 5ms loader, must all return the
// loader's value, and the first within loader + OpTimeout + 10ms (a
// timer-free budget whose Done still closes at the budget cuts go-redis's
// retry and dial backoffs; see budget.go).
func TestFaultKilledDefaultClient(t *testing.T) {
	for _, cte := range []bool{true, false} {
		t.Run(fmt.Sprintf("ContextTimeoutEnabled=%v", cte), func(t *testing.T) {
			srv := startRedis(t)
			rdb := redis.NewClient(&redis.Options{Addr: srv.addr(), ContextTimeoutEnabled: cte})
			t.Cleanup(func() { _ = rdb.Close() })
			c, err := New[string](rdb, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			const loader = 5 * time.Millisecond
			load := func(ctx context.Context) (string, error) {
				select {
				case <-time.After(loader):
					return "v", nil
				case <-ctx.Done():
					return "", ctx.Err()
				}
			}
			ctx := context.Background()
			for i := range 10 { // warm keys and pooled connections
				if _, err := c.Get(ctx, fmt.Sprint("k", i), load); err != nil {
					t.Fatal(err)
				}
			}
			srv.kill()
			bound := loader + defaultOpTimeout + 10*time.Millisecond
			if raceEnabled {
				bound += 40 * time.Millisecond // the race detector's own cost, not Redis's
			}
			var worst time.Duration
			for i := range 50 {
				gctx, cancel := context.WithTimeout(ctx, time.Second)
				start := time.Now()
				v, err := c.Get(gctx, fmt.Sprint("k", i%10), load)
				took := time.Since(start)
				cancel()
				if err != nil || v != "v" {
					t.Fatalf("Get %d after the kill = %q, %v after %v", i, v, err, took)
				}
				if i == 0 {
					t.Logf("first Get after the kill: %v (bound %v)", took, bound)
					if took > bound {
						t.Errorf("first Get after the kill took %v, over loader + OpTimeout + 10ms = %v", took, bound)
					}
				}
				worst = max(worst, took)
			}
			t.Logf("slowest of 50 Gets after the kill: %v; stats %+v", worst, c.Stats())
		})
	}
}

// slowScripts delays the scripts it names by d before sending them, as a
// starved CPU or a slow network would, and fails them when the command's
// budget ran out meanwhile.
type slowScripts struct {
	*redis.Client
	slow map[string]bool // SHA → delayed
	d    time.Duration
}

func (s *slowScripts) delay(ctx context.Context, sha string) error {
	if !s.slow[sha] {
		return nil
	}
	select {
	case <-time.After(s.d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *slowScripts) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	if err := s.delay(ctx, sha); err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	return s.Client.EvalSha(ctx, sha, keys, args...)
}

// TestFaultSlowFillDoesNotStrandWaiters: the holder's fill and release take
// 400ms to reach Redis, past the 200ms read budget. They are writes that
// matter and get the write budget (5 × OpTimeout, 1s), so the fill lands
// and a waiter in another process gets the value, instead of waiting out
// the lease (3s) and loading again. The margins are wide so that a starved
// core does not push the fill past its budget.
func TestFaultSlowFillDoesNotStrandWaiters(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		slow := &slowScripts{Client: b.client(t), d: 400 * time.Millisecond,
			slow: map[string]bool{fillScript.Hash(): true, releaseScript.Hash(): true}}
		if err := b.client(t).ScriptLoad(ctx, fillLua).Err(); err != nil { // EVALSHA finds it
			t.Fatal(err)
		}
		holder, err := New[string](slow, &Options[string]{Degradation: Degradation{OpTimeout: 200 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = holder.Close() })
		waiter := newCache[string](t, b, nil)
		key := b.key("slow-fill")
		var loads atomic.Int64
		inLoad, gate := make(chan struct{}), make(chan struct{})
		go func() {
			_, _ = holder.Get(ctx, key, func(context.Context) (string, error) {
				loads.Add(1)
				close(inLoad)
				<-gate
				return "v", nil
			})
		}()
		<-inLoad
		type res struct {
			v    string
			err  error
			took time.Duration
		}
		out := make(chan res, 1)
		go func() {
			start := time.Now()
			v, err := waiter.Get(ctx, key, func(context.Context) (string, error) { loads.Add(1); return "w", nil })
			out <- res{v, err, time.Since(start)}
		}()
		waitFor(t, "the waiter to meet the lease", func() bool { return waiter.Stats().LeaseContended == 1 })
		close(gate)
		r := <-out
		if r.err != nil || r.v != "v" || loads.Load() != 1 || r.took > 2*time.Second {
			t.Fatalf("waiter got %q, %v after %v with %d loads; want the holder's v before the lease (3s) ends, and 1 load", r.v, r.err, r.took, loads.Load())
		}
		t.Logf("waiter answered after %v", r.took.Round(time.Millisecond))
	})
}

// TestFaultRedisTimePerGet: Redis answers every lease script just under the
// command budget (45ms of 50ms) and another process holds the key's lease
// without ever filling it. Without a bound on the whole Get's Redis time,
// the Get would poll until the lease holder's time ran out (LoadTimeout +
// LeaseTTL, 8s). With RedisTimePerGet (default 4 × OpTimeout) it stops
// using Redis once 200ms of Redis time are spent and answers from the
// loader, uncached.
func TestFaultRedisTimePerGet(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		key := b.key("slow-polls")
		if held, _, err := acquire(ctx, b.client(t), key, newToken(), time.Minute); err != nil || !held {
			t.Fatalf("the other holder's lease: %v %v", held, err)
		}
		if err := b.client(t).ScriptLoad(ctx, acquireLua).Err(); err != nil {
			t.Fatal(err)
		}
		slow := &slowScripts{Client: b.client(t), d: 45 * time.Millisecond, slow: map[string]bool{acquireScript.Hash(): true}}
		c, err := New[string](slow, nil) // OpTimeout 50ms, RedisTimePerGet 200ms
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		var n counter
		start := time.Now()
		v, err := c.Get(ctx, key, n.load("v", 5*time.Millisecond))
		took := time.Since(start)
		// Redis time (200ms) + the loader + the pauses between polls (with
		// the wake channel live, a fallback poll every 50-150ms), far below
		// the 8s the Get would otherwise poll for.
		bound := time.Second
		if err != nil || v != "v" || n.calls.Load() != 1 || took > bound {
			t.Fatalf("Get = %q, %v after %v with %d loads; want the loader's value within %v", v, err, took, n.calls.Load(), bound)
		}
		t.Logf("Get answered after %v (Redis time spent, then the loader)", took.Round(time.Millisecond))
		var e envelope.Entry
		if raw := b.raw(t, key); raw == nil || envelope.Decode(raw, &e) != nil || e.Kind != envelope.Lease {
			t.Fatalf("the other holder's lease was replaced: %q", raw)
		}
	})
}

// lateScripts stands between the cache and Redis: the scripts in slow wait
// d before they are sent (a slow write); the scripts in late run at once,
// and their reply waits d (a reply that comes past the budget).
type lateScripts struct {
	*redis.Client
	d          time.Duration
	slow, late map[string]bool
}

func (s *lateScripts) wait(ctx context.Context) error {
	select {
	case <-time.After(s.d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *lateScripts) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	if s.slow[sha] {
		if err := s.wait(ctx); err != nil {
			cmd := redis.NewCmd(ctx)
			cmd.SetErr(err)
			return cmd
		}
	}
	if s.late[sha] {
		cmd := s.Client.EvalSha(context.WithoutCancel(ctx), sha, keys, args...)
		if err := s.wait(ctx); err != nil {
			cmd.SetErr(err)
		}
		return cmd
	}
	return s.Client.EvalSha(ctx, sha, keys, args...)
}

// TestWritesGetTheWriteBudget: the namespaced Set's script and a refresh's
// release are writes that must not be lost, and get WriteTimeout (here 5 ×
// the 200ms OpTimeout: 1s), though they go to Redis 400ms late (wide
// margins: a starved core must not decide it). The refresh's own lease
// round is a read: its reply, 400ms late, is past the budget, so the
// refresh gives up and must put the value back from "refreshing".
func TestWritesGetTheWriteBudget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		for _, src := range []string{setLua, releaseLua, refreshLua} {
			if err := b.client(t).ScriptLoad(ctx, src).Err(); err != nil { // EVALSHA finds them
				t.Fatal(err)
			}
		}
		ls := &lateScripts{Client: b.client(t), d: 400 * time.Millisecond,
			slow: map[string]bool{setScript.Hash(): true, releaseScript.Hash(): true},
			late: map[string]bool{refreshScript.Hash(): true}}

		ns := MustKeyspace("budgets", 1).Namespace(strings.TrimSuffix(b.prefix, ":"), "acme")
		nc, err := New[string](ls, &Options[string]{Namespaced: true, Degradation: Degradation{OpTimeout: 200 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = nc.Close() })
		if err := nc.Set(ctx, ns.Key("task", "1"), "set"); err != nil {
			t.Fatalf("namespaced Set 400ms late: %v; want it inside the write budget", err)
		}

		clock := newFakeClock()
		c, err := New[string](ls, &Options[string]{Clock: clock.Now, Degradation: Degradation{OpTimeout: 200 * time.Millisecond},
			Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		key := b.key("refreshed")
		load := func(context.Context) (string, error) { return "v", nil }
		if _, err := c.Get(ctx, key, load); err != nil {
			t.Fatal(err)
		}
		clock.Advance(2 * time.Minute) // stale: the Get serves it and refreshes in the background
		if v, err := c.Get(ctx, key, load); err != nil || v != "v" {
			t.Fatalf("stale Get = %q, %v", v, err)
		}
		waitFor(t, "the refresh to give up", func() bool { return c.Stats().RedisErrors > 0 })
		waitFor(t, "the value put back from refreshing", func() bool {
			var e envelope.Entry
			return envelope.Decode(b.raw(t, key), &e) == nil && e.Kind == envelope.Value
		})
	})
}
