package cacheaside

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The fault tests run against real redis-server processes that they start
// on free loopback ports and stop by pid, with Toxiproxy (in this process)
// in front when they need latency or a black hole. They run when
// CACHEASIDE_REDIS_FAULTS=1 (CI sets it), and then fail, not skip, if
// redis-server cannot start; a plain `go test ./...` on a machine with
// only Go skips them.

// envFaults enables the tests that start redis-server processes.
const envFaults = "CACHEASIDE_REDIS_FAULTS"

// requireRedisServer skips the test unless envFaults is set.
func requireRedisServer(t *testing.T) {
	t.Helper()
	if os.Getenv(envFaults) == "" {
		t.Skipf("starts redis-server processes: set %s=1 to run (needs redis-server on PATH)", envFaults)
	}
}

// redisProc is a redis-server this test started.
type redisProc struct {
	t    *testing.T
	port int
	args []string // more redis-server arguments
	cmd  *exec.Cmd
	done chan struct{} // closed once cmd has exited and been reaped
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startRedis(t *testing.T, args ...string) *redisProc {
	t.Helper()
	requireRedisServer(t)
	p := &redisProc{t: t, args: args}
	t.Cleanup(p.kill)
	// A free port can be taken between freePort and the bind (by another
	// test's server, or as the local port of a connection): the server then
	// exits, and it is tried again on another port.
	for attempt := 0; ; attempt++ {
		p.port = freePort(t)
		err := p.tryStart()
		if err == nil {
			return p
		}
		if attempt == 4 {
			t.Fatal(err)
		}
	}
}

func (p *redisProc) addr() string { return fmt.Sprintf("127.0.0.1:%d", p.port) }

// start starts the server again on its port (after kill).
func (p *redisProc) start() {
	p.t.Helper()
	if err := p.tryStart(); err != nil {
		p.t.Fatal(err)
	}
}

// tryStart starts redis-server on p.port and waits until the server there
// answers as itself (its pid: not another's that took the port).
func (p *redisProc) tryStart() error {
	var out bytes.Buffer
	p.cmd = exec.Command("redis-server", append([]string{"--port", fmt.Sprint(p.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"}, p.args...)...)
	p.cmd.Stdout, p.cmd.Stderr = &out, &out
	if err := p.cmd.Start(); err != nil {
		p.cmd = nil
		return fmt.Errorf("starting redis-server (it must be installed): %v", err)
	}
	p.done = make(chan struct{})
	cmd, done := p.cmd, p.done
	go func() { _ = cmd.Wait(); close(done) }()
	err := awaitServer(p.addr(), cmd.Process.Pid, done)
	switch {
	case errors.Is(err, errServerExited):
		p.cmd = nil
		return fmt.Errorf("%w: %s", err, out.String())
	case err != nil:
		p.kill()
	}
	return err
}

var errServerExited = errors.New("redis-server exited at start")

// awaitServer waits up to 10s until the redis-server on addr is the
// process pid (INFO server's process_id), not another server that took
// the port first. It returns errServerExited if exited closes first.
func awaitServer(addr string, pid int, exited <-chan struct{}) error {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer rdb.Close()
	want := fmt.Sprintf("process_id:%d\r\n", pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := rdb.Info(context.Background(), "server").Result()
		if err == nil && strings.Contains(info, want) {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%w on %s", errServerExited, addr)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s did not answer as itself within 10s (last error %v)", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill stops the server with SIGKILL and waits for it.
func (p *redisProc) kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
		p.cmd = nil
	}
}

// faultClient is a go-redis client configured as the README recommends.
func faultClient(t *testing.T, addr string) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true, MaxRetries: -1,
		DialTimeout: 100 * time.Millisecond, ReadTimeout: 100 * time.Millisecond, WriteTimeout: 100 * time.Millisecond,
		PoolSize: 32})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// durations keeps latencies for percentiles.
type durations struct {
	mu sync.Mutex
	d  []time.Duration
}

func (s *durations) add(d time.Duration) { s.mu.Lock(); s.d = append(s.d, d); s.mu.Unlock() }

func (s *durations) pct(p float64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	slices.Sort(s.d)
	if len(s.d) == 0 {
		return 0
	}
	return s.d[min(len(s.d)-1, int(float64(len(s.d))*p))]
}

// TestToxiLatency: Redis answers after 2s. A Get costs at most the budget
// plus the loader, not the 2s, and the breaker soon skips Redis.
func TestToxiLatency(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	const budget, loadTime = 50 * time.Millisecond, 5 * time.Millisecond
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{Degradation: Degradation{OpTimeout: budget, BreakerCooldown: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addToxic(t, proxy, `{"name":"slow","type":"latency","stream":"downstream","attributes":{"latency":2000}}`)
	var lat, bare durations
	load := func(ctx context.Context) (string, error) { time.Sleep(loadTime); return "v", nil }
	for i := 0; i < 40; i++ {
		t0 := time.Now()
		v, err := c.Get(context.Background(), fmt.Sprintf("k%d", i), load)
		lat.add(time.Since(t0))
		if err != nil || v != "v" {
			t.Fatalf("Get %d = %q, %v", i, v, err)
		}
		t0 = time.Now()
		_, _ = load(context.Background())
		bare.add(time.Since(t0))
	}
	p99 := lat.pct(0.99)
	t.Logf("latency toxic 2s: Get p50 %v p99 %v (budget %v + loader %v); no cache p99 %v; breaker opens %d",
		lat.pct(0.5), p99, budget, loadTime, bare.pct(0.99), c.Stats().BreakerOpens)
	// Not a speed goal: a bound that separates "waited for the budget" from
	// "waited for Redis" (2s), with room for a loaded machine.
	if p99 > budget+loadTime+200*time.Millisecond {
		t.Fatalf("p99 %v: a Get waited for the slow Redis", p99)
	}
	if c.Stats().BreakerOpens == 0 {
		t.Fatal("the breaker never opened")
	}
}

// TestBreakerBlackHoleAndRecovery: Redis accepts connections and never
// answers, then refuses them, then comes back. No Get fails (fail-open),
// the breaker opens within BreakerFailures failures, half-opens after the
// cooldown and closes once Redis answers again.
func TestBreakerBlackHoleAndRecovery(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	var states []string
	var mu sync.Mutex
	rec := &stateRecorder{on: func(s string) { mu.Lock(); states = append(states, s); mu.Unlock() }}
	const cooldown = 300 * time.Millisecond
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{Recorder: rec,
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerFailures: 3, BreakerCooldown: cooldown}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	load := func(context.Context) (string, error) { return "v", nil }
	get := func(i int) {
		t.Helper()
		if v, err := c.Get(context.Background(), fmt.Sprintf("k%d", i%5), load); err != nil || v != "v" {
			t.Fatalf("Get = %q, %v", v, err)
		}
	}
	for i := 0; i < 10; i++ {
		get(i) // warm
	}
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
	for i := 0; i < 10; i++ {
		get(i)
	}
	if s := c.Stats(); s.BreakerOpens != 1 || s.RedisErrors < 3 {
		t.Fatalf("black hole: %+v; want the breaker open after 3 failures", s)
	}
	skippedBefore := c.Stats().RedisSkipped
	for i := 0; i < 20; i++ {
		get(i)
	}
	if c.Stats().RedisSkipped <= skippedBefore {
		t.Fatal("open breaker still sent commands")
	}
	// Refused connections instead of a black hole.
	proxy.removeToxic("hole")
	proxy.enable(false)
	time.Sleep(cooldown + 50*time.Millisecond)
	for i := 0; i < 10; i++ {
		get(i) // the half-open probe fails: open again
	}
	// Redis back.
	proxy.enable(true)
	time.Sleep(cooldown + 50*time.Millisecond)
	for i := 0; i < 20; i++ {
		get(i)
	}
	hitsBefore := c.Stats().Hits
	for i := 0; i < 20; i++ {
		get(i)
	}
	if c.Stats().Hits == hitsBefore {
		t.Fatal("no hits after Redis came back")
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("breaker states: %v; stats %+v", states, c.Stats())
	if len(states) < 4 || states[0] != "open" || states[len(states)-1] != "closed" || !slices.Contains(states, "half-open") {
		t.Fatalf("breaker states %v; want open … half-open … closed", states)
	}
}

type stateRecorder struct {
	on func(string)
}

func (r *stateRecorder) Record(_ context.Context, ev Event) {
	if ev.Kind == "breaker_state" {
		r.on(ev.State)
	}
}

// TestRedisKilledUnderLoad: the redis-server is killed for 2.5s under
// concurrent Gets: none fails, loads that bypass Redis never exceed the
// cap, and hits resume after the restart.
func TestRedisKilledUnderLoad(t *testing.T) {
	srv := startRedis(t)
	const capLoads = 4
	c, err := New[string](faultClient(t, srv.addr()), &Options[string]{
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerCooldown: 200 * time.Millisecond, MaxLoadsWhileDown: capLoads}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// maxRunning is measured only while Redis is dead, when every load
	// bypasses it; with Redis up, loads of different keys run side by side
	// under their leases and no cap applies.
	var running, maxRunning, failed, gets atomic.Int64
	var outage atomic.Bool
	load := func(ctx context.Context) (string, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for m := maxRunning.Load(); outage.Load() && n > m && !maxRunning.CompareAndSwap(m, n); m = maxRunning.Load() {
		}
		time.Sleep(5 * time.Millisecond)
		return "v", nil
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				v, err := c.Get(context.Background(), fmt.Sprintf("k%d", (w*7+i)%40), load)
				gets.Add(1)
				if err != nil || v != "v" {
					failed.Add(1)
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	srv.kill()
	time.Sleep(50 * time.Millisecond) // loads begun before the kill end
	outage.Store(true)
	time.Sleep(2450 * time.Millisecond)
	outage.Store(false)
	srv.start()
	time.Sleep(1000 * time.Millisecond)
	hitsBefore := c.Stats().Hits
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	s := c.Stats()
	t.Logf("killed for 2.5s under 16 workers: %d Gets, %d failed, max %d loads at once while down (cap %d), breaker opened %d times, %d Redis commands skipped",
		gets.Load(), failed.Load(), maxRunning.Load(), capLoads, s.BreakerOpens, s.RedisSkipped)
	if failed.Load() != 0 {
		t.Fatalf("%d Gets failed", failed.Load())
	}
	if maxRunning.Load() > capLoads {
		t.Fatalf("%d loads at once, cap %d", maxRunning.Load(), capLoads)
	}
	if s.Hits == hitsBefore {
		t.Fatal("no hits after the restart")
	}
	if s.BreakerOpens == 0 {
		t.Fatal("the breaker never opened")
	}
}

// TestOutageFailClosed: with FailClosed, a Get returns ErrRedisUnavailable
// within the budget and never calls the loader.
func TestOutageFailClosed(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	const budget = 50 * time.Millisecond
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{Degradation: Degradation{OpTimeout: budget, OnRedisDown: FailClosed}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
	var calls atomic.Int64
	var lat durations
	for i := 0; i < 10; i++ {
		t0 := time.Now()
		_, err := c.Get(context.Background(), fmt.Sprintf("k%d", i), func(context.Context) (string, error) { calls.Add(1); return "v", nil })
		lat.add(time.Since(t0))
		if !errors.Is(err, ErrRedisUnavailable) {
			t.Fatalf("Get = %v, want ErrRedisUnavailable", err)
		}
	}
	if calls.Load() != 0 {
		t.Fatalf("loader called %d times under FailClosed", calls.Load())
	}
	t.Logf("fail-closed, black hole: p99 %v (budget %v)", lat.pct(0.99), budget)
	if p := lat.pct(0.99); p > budget+200*time.Millisecond {
		t.Fatalf("fail-closed took %v, more than the budget", p)
	}
}

// TestOutageOverloaded: past MaxLoadsWhileDown, FailFastWhenCapped returns
// ErrOverloaded instead of adding load to the source.
func TestOutageOverloaded(t *testing.T) {
	rdb := faultClient(t, closedAddr(t))
	c, err := New[string](rdb, &Options[string]{Degradation: Degradation{MaxLoadsWhileDown: 2, FailFastWhenCapped: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	release := make(chan struct{})
	var wg sync.WaitGroup
	var over, ok atomic.Int64
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c.Get(context.Background(), fmt.Sprintf("k%d", i), func(context.Context) (string, error) { <-release; return "v", nil })
			switch {
			case errors.Is(err, ErrOverloaded):
				over.Add(1)
			case err == nil:
				ok.Add(1)
			default:
				t.Errorf("Get: %v", err)
			}
		}()
	}
	waitFor(t, "the other Gets to be refused", func() bool { return over.Load() == 4 })
	close(release)
	wg.Wait()
	if ok.Load() != 2 || c.Stats().Overloaded != 4 {
		t.Fatalf("served %d, overloaded %d; want 2 and 4", ok.Load(), c.Stats().Overloaded)
	}
}

// TestOutageInvalidation: writes and invalidations return their error
// during an outage.
func TestOutageInvalidation(t *testing.T) {
	c, err := New[string](faultClient(t, closedAddr(t)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Invalidate(context.Background(), "k"); err == nil {
		t.Fatal("Invalidate during an outage returned nil")
	}
	if err := c.Set(context.Background(), "k", "v"); err == nil {
		t.Fatal("Set during an outage returned nil")
	}
	if _, err := c.InvalidatePrefix(context.Background(), "k"); err == nil {
		t.Fatal("InvalidatePrefix during an outage returned nil")
	}
}

// TestOutageInvalidationRetry: with RetryInvalidations, an invalidation
// that failed during an outage is applied once Redis is back.
func TestOutageInvalidationRetry(t *testing.T) {
	srv := startRedis(t)
	proxy := newProxy(t, srv.addr())
	c, err := New[string](faultClient(t, proxy.Listen), &Options[string]{
		Degradation: Degradation{OpTimeout: 50 * time.Millisecond, BreakerCooldown: 100 * time.Millisecond, RetryInvalidations: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	// Requests vanish on the way to Redis: the UNLINK never arrives.
	addToxic(t, proxy, `{"name":"hole","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
	if _, err := c.Invalidate(ctx, "k"); err == nil {
		t.Fatal("Invalidate into a black hole returned nil")
	}
	direct := faultClient(t, srv.addr())
	time.Sleep(300 * time.Millisecond)
	if direct.Exists(ctx, "k").Val() != 1 {
		t.Fatal("the UNLINK reached Redis through the black hole")
	}
	proxy.removeToxic("hole")
	waitFor(t, "the retried invalidation", func() bool { return direct.Exists(ctx, "k").Val() == 0 })
	waitFor(t, "the retry to be counted", func() bool { return c.Stats().RetriedInvals == 1 })
	if s := c.Stats(); s.DroppedInvals != 0 {
		t.Fatalf("stats %+v; want 1 retried invalidation", s)
	}
	if v, _ := c.Get(ctx, "k", func(context.Context) (string, error) { return "new", nil }); v != "new" {
		t.Fatalf("Get after the retry = %q", v)
	}
}
