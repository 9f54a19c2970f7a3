package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ctlRedis lets a test intercept scripts and UNLINK.
type ctlRedis struct {
	Redis
	script func(ctx context.Context) *redis.Cmd                    // nil: pass through
	unlink func(ctx context.Context, keys ...string) *redis.IntCmd // nil: pass through
}

func (r *ctlRedis) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	if r.script != nil {
		return r.script(ctx)
	}
	return r.Redis.EvalSha(ctx, sha, keys, args...)
}

func (r *ctlRedis) Eval(ctx context.Context, s string, keys []string, args ...any) *redis.Cmd {
	if r.script != nil {
		return r.script(ctx)
	}
	return r.Redis.Eval(ctx, s, keys, args...)
}

func (r *ctlRedis) Unlink(ctx context.Context, keys ...string) *redis.IntCmd {
	if r.unlink != nil {
		return r.unlink(ctx, keys...)
	}
	return r.Redis.Unlink(ctx, keys...)
}

// R1: GET answers, scripts are black-holed. A miss burns acquire + release
// (two budgets) before falling back; FailClosed is not "within the budget".
func TestFaultScriptsBlackHoledWithinBudget(t *testing.T) {
	srv := startRedis(t)
	hole := func(ctx context.Context) *redis.Cmd {
		<-ctx.Done()
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(ctx.Err())
		return cmd
	}
	const budget = 50 * time.Millisecond
	for _, pol := range []RedisDownPolicy{FailOpen, FailClosed} {
		w := &ctlRedis{Redis: faultClient(t, srv.addr()), script: hole}
		c, err := New[string](w, &Options[string]{Degradation: Degradation{OpTimeout: budget, NoBreaker: true, OnRedisDown: pol}})
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		_, err = c.Get(context.Background(), "k", func(context.Context) (string, error) { return "v", nil })
		d := time.Since(t0)
		t.Logf("%v: Get took %v (budget %v), err %v", pol, d, budget, err)
		if d > budget+budget/2 {
			t.Errorf("%v: Get took %v: more than one budget", pol, d)
		}
		c.Close()
	}
}

// R3: callers whose deadline is below OpTimeout: every Get fails on a
// black-holed Redis and the breaker never opens (all timeouts "excluded").
func TestFaultShortCallerDeadline(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{Degradation: Degradation{OpTimeout: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
	failed := 0
	for i := 0; i < 30; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Millisecond)
		_, err := c.Get(ctx, fmt.Sprintf("k%d", i), func(context.Context) (string, error) { return "v", nil })
		cancel()
		if err != nil {
			failed++
		}
	}
	t.Logf("caller deadline 40ms, budget 50ms, black hole: %d/30 Gets failed, breaker opens %d", failed, c.Stats().BreakerOpens)
	if failed > 0 && c.Stats().BreakerOpens == 0 {
		t.Errorf("%d Gets failed and the breaker never opened", failed)
	}
}

// R4: InvalidatePrefix that fails because the caller's deadline (< the 1s
// bulk budget) ran out on a black-holed Redis is never retried.
func TestOutagePrefixRetryAfterDeadline(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerCooldown: 100 * time.Millisecond, RetryInvalidations: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bg := context.Background()
	if err := c.Set(bg, "p:1", "old"); err != nil {
		t.Fatal(err)
	}
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
	ctx, cancel := context.WithTimeout(bg, 60*time.Millisecond)
	_, err = c.InvalidatePrefix(ctx, "p:")
	cancel()
	t.Logf("InvalidatePrefix: %v", err)
	proxy.removeToxic("hole")
	time.Sleep(1500 * time.Millisecond)
	direct := faultClient(t, srv.addr())
	if direct.Exists(bg, "p:1").Val() == 1 {
		t.Errorf("failed InvalidatePrefix never retried: stats %+v", c.Stats())
	}
}

// R5: a second failed Invalidate of a key whose retry is in flight is
// swallowed by the first one's queue entry and lost.
func TestOutageRetryKeepsLaterInvalidation(t *testing.T) {
	srv := startRedis(t)
	base := faultClient(t, srv.addr())
	var mode atomic.Int32 // 0 pass, 1 fail, 2 succeed then block the reply
	entered, release := make(chan struct{}), make(chan struct{})
	w := &ctlRedis{Redis: base}
	w.unlink = func(ctx context.Context, keys ...string) *redis.IntCmd {
		switch mode.Load() {
		case 1:
			cmd := redis.NewIntCmd(ctx)
			cmd.SetErr(errors.New("i/o timeout"))
			return cmd
		case 2:
			cmd := base.Unlink(ctx, keys...) // applied in Redis
			mode.Store(0)
			close(entered)
			<-release // reply delayed
			return cmd
		}
		return base.Unlink(ctx, keys...)
	}
	c, err := New[string](w, &Options[string]{Degradation: Degradation{RetryInvalidations: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bg := context.Background()
	mode.Store(1)
	if _, err := c.Invalidate(bg, "k"); err == nil { // write 1's invalidation fails
		t.Fatal("want error")
	}
	mode.Store(2)
	<-entered // the retry's UNLINK ran in Redis; its reply is on its way
	// A load that read the DB before write 2 fills the key.
	if err := c.Set(bg, "k", "old"); err != nil {
		t.Fatal(err)
	}
	mode.Store(1)
	if _, err := c.Invalidate(bg, "k"); err == nil { // write 2's invalidation fails
		t.Fatal("want error")
	}
	mode.Store(0)
	close(release)
	waitFor(t, "the retry to finish", func() bool { return c.Stats().RetriedInvals >= 1 })
	time.Sleep(1 * time.Second)
	if v, _ := c.Get(bg, "k", func(context.Context) (string, error) { return "new", nil }); v != "new" {
		t.Errorf("Get = %q after two invalidations with RetryInvalidations: the second was lost (stats %+v)", v, c.Stats())
	}
}

// R3b: Redis refusing connections, callers with a 30ms deadline.
func TestFaultRefusedShortDeadline(t *testing.T) {
	rdb := faultClient(t, closedAddr(t))
	t0 := time.Now()
	err := rdb.Get(context.Background(), "x").Err()
	t.Logf("raw GET to a refused port: %v after %v", err, time.Since(t0))
	t0 = time.Now()
	err = rdb.Get(context.Background(), "x").Err()
	t.Logf("raw GET to a refused port again: %v after %v", err, time.Since(t0))
	c, err := New[string](rdb, &Options[string]{Degradation: Degradation{OpTimeout: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, dl := range []time.Duration{30 * time.Millisecond, 200 * time.Millisecond} {
		failed := 0
		var lat durations
		for i := 0; i < 30; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), dl)
			t0 := time.Now()
			_, err := c.Get(ctx, fmt.Sprintf("k%d", i), func(context.Context) (string, error) { return "v", nil })
			lat.add(time.Since(t0))
			cancel()
			if err != nil {
				failed++
			}
		}
		t.Logf("refused, caller deadline %v: %d/30 failed, p50 %v, stats %+v", dl, failed, lat.pct(0.5), c.Stats())
		if failed > 0 {
			t.Errorf("caller deadline %v: %d Gets failed with Redis refusing connections", dl, failed)
		}
	}
}

// masterRedis looks like a cluster: InvalidatePrefix goes to ForEachMaster.
type masterRedis struct {
	Redis
	node *redis.Client
}

func (m *masterRedis) ForEachMaster(ctx context.Context, fn func(context.Context, *redis.Client) error) error {
	return fn(ctx, m.node)
}

// R7: the retried InvalidatePrefix on a cluster runs on c.stop (no
// deadline) outside the budget: a black-holed node holds the retry loop
// for the client's ReadTimeout, and Close waits for it.
func TestOutagePrefixRetryDoesNotHoldClose(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	node := redis.NewClient(&redis.Options{Addr: proxy.Listen, ContextTimeoutEnabled: true, MaxRetries: -1, ReadTimeout: 3 * time.Second})
	defer node.Close()
	c, err := New[string](&masterRedis{Redis: node, node: node}, &Options[string]{Degradation: Degradation{RetryInvalidations: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	bg := context.Background()
	_ = node.Set(bg, "p:1", "x", 0).Err()
	// A refused connection makes the first attempt fail fast.
	proxy.enable(false)
	if _, err := c.InvalidatePrefix(bg, "p:"); err == nil {
		t.Fatal("want error")
	}
	proxy.enable(true)
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
	time.Sleep(300 * time.Millisecond) // the retry loop is now stuck in SCAN
	t0 := time.Now()
	c.Close()
	t.Logf("Close took %v", time.Since(t0))
	if d := time.Since(t0); d > time.Second {
		t.Errorf("Close blocked %v behind a retried InvalidatePrefix", d)
	}
}

// failFill makes fill.lua time out without running.
type failFill struct{ Redis }

func (f *failFill) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	if sha == fillScript.Hash() {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(context.DeadlineExceeded)
		return cmd
	}
	return f.Redis.EvalSha(ctx, sha, keys, args...)
}

// R8: one failed fill leaves the lease in place (no release); a Get in
// another process waits for the lease to expire (LeaseTTL), far past any
// budget, although Redis is answering.
func TestFaultFailedFillReleasesLease(t *testing.T) {
	srv := startRedis(t)
	a, _ := New[string](&failFill{faultClient(t, srv.addr())}, nil)
	b, _ := New[string](faultClient(t, srv.addr()), nil)
	defer a.Close()
	defer b.Close()
	load := func(context.Context) (string, error) { time.Sleep(200 * time.Millisecond); return "v", nil }
	go func() { _, _ = a.Get(context.Background(), "k", load) }()
	time.Sleep(50 * time.Millisecond)
	t0 := time.Now()
	v, err := b.Get(context.Background(), "k", load)
	d := time.Since(t0)
	t.Logf("Get in the other process: %q, %v after %v (loader 200ms)", v, err, d)
	if d > time.Second {
		t.Errorf("a Get waited %v for a lease stranded by one failed fill", d)
	}
}
