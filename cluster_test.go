package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The cluster tests run the cache on a real 3-master Redis Cluster that
// each test starts from redis-server and redis-cli on PATH, on free
// loopback ports, and stops by pid. They run only when
// CACHEASIDE_REDIS_CLUSTER=1 (CI sets it), so a machine with only Go
// still passes `go test ./...`; when it is set, a cluster that cannot
// start fails the test.

// envCluster turns the cluster tests on when it is "1".
const envCluster = "CACHEASIDE_REDIS_CLUSTER"

// clusterAddrs skips the test unless the cluster tests are on, and
// otherwise starts a cluster and returns its node addresses.
func clusterAddrs(t *testing.T) []string {
	t.Helper()
	if os.Getenv(envCluster) != "1" {
		t.Skipf("Redis Cluster tests are off; run them with %s=1 (they start a 3-master cluster with redis-server and redis-cli from PATH)", envCluster)
	}
	return startCluster(t)
}

// clusterProc is one redis-server of a test cluster.
type clusterProc struct {
	port int
	dir  string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and been reaped
}

func (p *clusterProc) addr() string { return fmt.Sprintf("127.0.0.1:%d", p.port) }

// logTail returns the end of the node's log, for failure messages.
func (p *clusterProc) logTail() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "redis.log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// startCluster starts three redis-server processes in cluster mode, joins
// them into a cluster of three masters with redis-cli --cluster create,
// and waits until every node reports cluster_state:ok. The processes are
// killed (and reaped) at cleanup. It fails the test if the cluster does
// not come up.
func startCluster(t *testing.T) []string {
	t.Helper()
	addrs, _ := startClusterOf(t, 3, 0)
	return addrs
}

// startClusterOf starts a cluster of masters, each with replicas replicas,
// every node started with the redis-server arguments extra, and returns
// the addresses of its nodes and their processes (for a test that kills
// one).
func startClusterOf(t *testing.T, masters, replicas int, extra ...string) ([]string, []*clusterProc) {
	t.Helper()
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s=1 but %s is not on PATH: %v", envCluster, bin, err)
		}
	}
	used := map[int]bool{}
	port := func() int {
		for {
			if p := freePort(t); !used[p] {
				used[p] = true
				return p
			}
		}
	}
	procs := make([]*clusterProc, masters*(1+replicas))
	for i := range procs {
		var err error
		// A free port can be taken between freePort and the bind: try again.
		for attempt := 0; attempt < 3; attempt++ {
			if procs[i], err = startClusterNode(t, port(), port(), extra...); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("starting cluster node %d: %v", i, err)
		}
	}
	addrs := make([]string, len(procs))
	for i, p := range procs {
		addrs[i] = p.addr()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", fmt.Sprint(replicas), "--cluster-yes")
	if out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}

	deadline := time.Now().Add(20 * time.Second)
	for _, p := range procs {
		rdb := redis.NewClient(&redis.Options{Addr: p.addr(), MaxRetries: -1})
		var info string
		for {
			var err error
			info, err = rdb.ClusterInfo(context.Background()).Result()
			if err == nil && strings.Contains(info, "cluster_state:ok") && strings.Contains(info, fmt.Sprintf("cluster_known_nodes:%d\r\n", len(procs))) {
				break
			}
			if time.Now().After(deadline) {
				_ = rdb.Close()
				t.Fatalf("cluster node %s not ready after 20s (err %v):\n%s\nlog:\n%s", p.addr(), err, info, p.logTail())
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = rdb.Close()
	}
	return addrs, procs
}

// startClusterNode starts one cluster-mode redis-server on port, with its
// cluster bus on busPort (port+10000 may be past 65535), and waits for it
// to answer as itself. On success the process is stopped at cleanup.
func startClusterNode(t *testing.T, port, busPort int, extra ...string) (*clusterProc, error) {
	t.Helper()
	p := &clusterProc{port: port, dir: t.TempDir(), done: make(chan struct{})}
	logf, err := os.Create(filepath.Join(p.dir, "redis.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child keeps its own descriptor
	p.cmd = exec.Command("redis-server", append([]string{
		"--cluster-enabled", "yes",
		"--cluster-config-file", filepath.Join(p.dir, fmt.Sprintf("nodes-%d.conf", port)),
		"--cluster-port", fmt.Sprint(busPort),
		"--cluster-node-timeout", "2000",
		"--port", fmt.Sprint(port), "--bind", "127.0.0.1",
		"--dir", p.dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no"}, extra...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("redis-server (it must be installed): %w", err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	stop := func() { _ = p.cmd.Process.Kill(); <-p.done }

	if err := awaitServer(p.addr(), p.cmd.Process.Pid, p.done); err != nil {
		if !errors.Is(err, errServerExited) {
			stop()
		}
		return nil, fmt.Errorf("%w:\n%s", err, p.logTail())
	}
	t.Cleanup(stop)
	return p, nil
}

// clusterClient returns a new cluster client, as a separate process would
// have, closed at cleanup.
func clusterClient(t *testing.T, addrs []string) *redis.ClusterClient {
	t.Helper()
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ContextTimeoutEnabled: true, PoolSize: 64})
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// clusterCache builds a Cache on cc, closed at cleanup. The operation
// budget is 2s: the default 50ms is too tight for a cluster client's
// first slot discovery, under -race.
func clusterCache[T any](t *testing.T, cc *redis.ClusterClient, o *Options[T]) *Cache[T] {
	t.Helper()
	if o == nil {
		o = &Options[T]{}
	}
	o.Degradation.OpTimeout = 2 * time.Second
	c, err := New[T](cc, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// keysPerMaster counts the keys matching pattern on each master, by
// address; every master has an entry.
func keysPerMaster(t *testing.T, cc *redis.ClusterClient, pattern string) map[string]int {
	t.Helper()
	var mu sync.Mutex
	m := map[string]int{}
	err := cc.ForEachMaster(context.Background(), func(ctx context.Context, cl *redis.Client) error {
		n := 0
		iter := cl.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			n++
		}
		if err := iter.Err(); err != nil {
			return err
		}
		mu.Lock()
		m[cl.Options().Addr] = n
		mu.Unlock()
		return nil
	})
	if err != nil {
		t.Fatalf("counting %s per master: %v", pattern, err)
	}
	return m
}

// onEveryMaster fails the test unless the keys counted in m lie on all
// three masters.
func onEveryMaster(t *testing.T, what string, m map[string]int) {
	t.Helper()
	if len(m) != 3 {
		t.Fatalf("%s: %d masters, want 3: %v", what, len(m), m)
	}
	for addr, n := range m {
		if n == 0 {
			t.Fatalf("%s: no keys on master %s: %v (they should spread over every master)", what, addr, m)
		}
	}
	t.Logf("%s per master: %v", what, m)
}

func totalKeys(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// slotMap tells which master serves a key.
type slotMap struct {
	cc     *redis.ClusterClient
	shards []redis.ClusterShard
}

func newSlotMap(t *testing.T, cc *redis.ClusterClient) *slotMap {
	t.Helper()
	shards, err := cc.ClusterShards(context.Background()).Result()
	if err != nil {
		t.Fatalf("CLUSTER SHARDS: %v", err)
	}
	return &slotMap{cc: cc, shards: shards}
}

func (s *slotMap) slot(t *testing.T, key string) int64 {
	t.Helper()
	slot, err := s.cc.ClusterKeySlot(context.Background(), key).Result()
	if err != nil {
		t.Fatalf("CLUSTER KEYSLOT %s: %v", key, err)
	}
	return slot
}

func (s *slotMap) master(t *testing.T, key string) string {
	t.Helper()
	slot := s.slot(t, key)
	for _, sh := range s.shards {
		for _, r := range sh.Slots {
			if r.Start <= slot && slot <= r.End {
				for _, n := range sh.Nodes {
					if n.Role == "master" {
						return fmt.Sprintf("%s:%d", n.IP, n.Port)
					}
				}
			}
		}
	}
	t.Fatalf("slot %d of %s is served by no master", slot, key)
	return ""
}

// onePerMaster tries the keys name(0), name(1), … and returns the first
// i whose key lies on each of the three masters.
func onePerMaster(t *testing.T, cc *redis.ClusterClient, name func(i int) string) []int {
	t.Helper()
	sm := newSlotMap(t, cc)
	seen := map[string]bool{}
	var picked []int
	for i := 0; len(picked) < 3; i++ {
		if i > 1000 {
			t.Fatalf("no key on every master among 1000: found %v", seen)
		}
		if m := sm.master(t, name(i)); !seen[m] {
			seen[m] = true
			picked = append(picked, i)
		}
	}
	return picked
}

// TestClusterGetHitMiss: on a cluster, a first Get misses and loads, the
// next one hits with no load, for keys on every master, and Stats counts
// both.
func TestClusterGetHitMiss(t *testing.T) {
	addrs := clusterAddrs(t)
	cc := clusterClient(t, addrs)
	c := clusterCache[string](t, cc, nil)
	ctx := context.Background()
	p := uniquePrefix()
	const n = 60
	var calls atomic.Int64
	load := func(k string) Loader[string] {
		return func(context.Context) (string, error) { calls.Add(1); return "v:" + k, nil }
	}
	for round := 0; round < 2; round++ {
		for i := 0; i < n; i++ {
			k := fmt.Sprintf("%sitem:%d", p, i)
			v, err := c.Get(ctx, k, load(k))
			if err != nil || v != "v:"+k {
				t.Fatalf("round %d: Get %s = %q, %v", round, k, v, err)
			}
		}
		if got := calls.Load(); got != n {
			t.Fatalf("round %d: %d loader calls, want %d", round, got, n)
		}
	}
	onEveryMaster(t, "cached keys", keysPerMaster(t, cc, wire.EscapeGlob(p)+"*"))
	s := c.Stats()
	if s.Misses != n || s.Loads != n || s.Hits != n || s.RedisErrors != 0 || s.FillsRejected != 0 {
		t.Fatalf("stats %+v; want %d misses, loads and hits and no Redis errors", s, n)
	}
	if r := s.HitRate(); r != 0.5 {
		t.Fatalf("hit rate %v, want 0.5", r)
	}
}

// TestClusterNegativeCaching: 1,000 concurrent Gets of a missing id on a
// cluster call the loader once; later Gets hit the tombstone.
func TestClusterNegativeCaching(t *testing.T) {
	addrs := clusterAddrs(t)
	cc := clusterClient(t, addrs)
	errNoRow := errors.New("no row")
	c := clusterCache(t, cc, &Options[string]{IsNotFound: func(err error) bool { return errors.Is(err, errNoRow) }})
	ctx := context.Background()
	key := uniquePrefix() + "user:404"
	var calls atomic.Int64
	load := func(context.Context) (string, error) {
		calls.Add(1)
		time.Sleep(20 * time.Millisecond)
		return "", errNoRow
	}
	const gets = 1000
	start := make(chan struct{})
	var wg sync.WaitGroup
	var notFound atomic.Int64
	for i := 0; i < gets; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, err := c.Get(ctx, key, load)
			if err != ErrNotFound {
				t.Errorf("Get = %v, want ErrNotFound itself", err)
				return
			}
			notFound.Add(1)
		}()
	}
	close(start)
	wg.Wait()
	if notFound.Load() != gets || calls.Load() != 1 {
		t.Fatalf("%d of %d Gets saw ErrNotFound, loader called %d times; want all and 1", notFound.Load(), gets, calls.Load())
	}
	before := c.Stats().NegativeHits
	for i := 0; i < 10; i++ {
		if _, err := c.Get(ctx, key, load); err != ErrNotFound {
			t.Fatalf("Get after the tombstone = %v", err)
		}
	}
	if calls.Load() != 1 || c.Stats().NegativeHits != before+10 {
		t.Fatalf("loader calls %d, negative hits %d → %d; want 1 call and 10 more negative hits", calls.Load(), before, c.Stats().NegativeHits)
	}
	ttl, err := cc.PTTL(ctx, key).Result()
	if err != nil || ttl <= 0 || ttl > defaultNegativeTTL {
		t.Fatalf("tombstone PTTL = %v, %v; want within the negative TTL %v", ttl, err, defaultNegativeTTL)
	}
	t.Logf("stats %+v", c.Stats())
}

// TestClusterStampede: 4 processes (caches with their own cluster
// clients), 250 concurrent Gets each of one cold key whose load takes
// 50ms: exactly one loader call in all.
func TestClusterStampede(t *testing.T) {
	addrs := clusterAddrs(t)
	const procs, perProc = 4, 250
	caches := make([]*Cache[string], procs)
	for i := range caches {
		// One Name, as processes sharing a cache have: one wake channel.
		caches[i] = clusterCache[string](t, clusterClient(t, addrs), &Options[string]{Name: "stampede"})
		waitFor(t, "the wake channel", caches[i].wake.live.Load)
	}
	ctx := context.Background()
	// Slot maps, scripts and pooled connections ready, as in a running
	// service: one warm-up stampede on another key.
	warm := uniquePrefix() + "warm"
	var ww sync.WaitGroup
	for _, c := range caches {
		for range perProc {
			ww.Go(func() {
				if _, err := c.Get(ctx, warm, func(context.Context) (string, error) { return "w", nil }); err != nil {
					t.Error(err)
				}
			})
		}
	}
	ww.Wait()
	key := uniquePrefix() + "hot"
	lat := make([]time.Duration, procs*perProc)
	var cnt counter
	var loadStart atomic.Int64 // ns after the stampede began
	var t0 time.Time
	inner := cnt.load("value", 50*time.Millisecond)
	load := func(ctx context.Context) (string, error) {
		loadStart.Store(int64(time.Since(t0)))
		return inner(ctx)
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	var bad atomic.Int64
	for ci, c := range caches {
		for i := 0; i < perProc; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				g0 := time.Now()
				v, err := c.Get(ctx, key, load)
				lat[ci*perProc+i] = time.Since(g0)
				if err != nil || v != "value" {
					bad.Add(1)
					t.Errorf("Get = %q, %v", v, err)
				}
			}()
		}
	}
	t0 = time.Now()
	close(start)
	wg.Wait()
	var contended, coalesced uint64
	for _, c := range caches {
		s := c.Stats()
		contended += s.LeaseContended
		coalesced += s.Coalesced
	}
	slices.Sort(lat)
	t.Logf("%d Gets in %v: %d loader calls (started %v in), %d coalesced in-process, %d keys waited for another process's lease; latency p50 %v, p99 %v, max %v",
		procs*perProc, time.Since(t0), cnt.calls.Load(), time.Duration(loadStart.Load()).Round(100*time.Microsecond), coalesced, contended,
		lat[len(lat)/2].Round(100*time.Microsecond), lat[len(lat)*99/100].Round(100*time.Microsecond), lat[len(lat)-1].Round(100*time.Microsecond))
	if bad.Load() != 0 {
		t.Fatalf("%d Gets failed", bad.Load())
	}
	if n := cnt.calls.Load(); n != 1 {
		t.Fatalf("loader called %d times, want 1", n)
	}
}

// TestClusterInvalidate: one Invalidate call deletes keys on all three
// masters, and revokes loads in flight on each of them.
func TestClusterInvalidate(t *testing.T) {
	addrs := clusterAddrs(t)
	t.Run("many-keys", func(t *testing.T) {
		cc := clusterClient(t, addrs)
		c := clusterCache[string](t, cc, nil)
		ctx := context.Background()
		p := uniquePrefix()
		const n = 300
		keys := make([]string, n)
		var cnt counter
		for i := range keys {
			keys[i] = fmt.Sprintf("%srow:%d", p, i)
			if _, err := c.Get(ctx, keys[i], cnt.load("old", 0)); err != nil {
				t.Fatal(err)
			}
		}
		pattern := wire.EscapeGlob(p) + "*"
		onEveryMaster(t, "keys before Invalidate", keysPerMaster(t, cc, pattern))
		if _, err := c.Invalidate(ctx, keys...); err != nil {
			t.Fatalf("Invalidate of %d keys on 3 masters: %v", n, err)
		}
		if left := keysPerMaster(t, cc, pattern); totalKeys(left) != 0 {
			t.Fatalf("keys left after Invalidate: %v", left)
		}
		if got := c.Stats().Invalidations; got != n {
			t.Fatalf("Stats.Invalidations = %d, want %d", got, n)
		}
		for _, k := range keys {
			if v, err := c.Get(ctx, k, cnt.load("new", 0)); err != nil || v != "new" {
				t.Fatalf("Get %s after Invalidate = %q, %v; want a reload", k, v, err)
			}
		}
		if got := cnt.calls.Load(); got != 2*n {
			t.Fatalf("%d loader calls, want %d", got, 2*n)
		}
	})
	for _, control := range []bool{false, true} {
		name := "in-flight/leases"
		if control {
			name = "in-flight/control-no-token-check"
		}
		t.Run(name, func(t *testing.T) { clusterStaleSetRace(t, addrs, control) })
	}
}

// clusterStaleSetRace is TestStaleSetRace on one key per master at once:
// readers load the old row, a writer commits and invalidates all three
// keys in one call, then the readers try to fill. The fills must be
// refused (with control, the token check is off and the stale rows must
// stick, which shows the test can see the race).
func clusterStaleSetRace(t *testing.T, addrs []string, control bool) {
	ctx := context.Background()
	cc := clusterClient(t, addrs)
	reader := clusterCache[int64](t, cc, nil)
	reader.hooks = &testHooks{fill: noTokenCheck(control)}
	writer := clusterCache[int64](t, clusterClient(t, addrs), nil)
	p := uniquePrefix()
	name := func(i int) string { return fmt.Sprintf("%srow:%d", p, i) }
	var keys []string
	for _, i := range onePerMaster(t, cc, name) {
		keys = append(keys, name(i))
	}

	var db atomic.Int64 // the rows' version
	db.Store(1)
	var inLoad sync.WaitGroup
	inLoad.Add(len(keys))
	resume := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(resume) }) }
	defer release()
	loadOld := func(ctx context.Context) (int64, error) {
		row := db.Load()
		inLoad.Done()
		select { // the writer commits and invalidates meanwhile
		case <-resume:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		return row, nil
	}
	got := make(chan int64, len(keys))
	for _, k := range keys {
		go func() {
			v, err := reader.Get(ctx, k, loadOld)
			if err != nil {
				t.Errorf("reader Get %s: %v", k, err)
			}
			got <- v
		}()
	}
	inLoad.Wait()
	db.Store(2)
	if _, err := writer.Invalidate(ctx, keys...); err != nil {
		t.Fatal(err)
	}
	release()
	for range keys {
		if old := <-got; old != 1 {
			t.Fatalf("reader got %d, want the row it read (1)", old)
		}
	}
	want := int64(2)
	if control {
		want = 1
	}
	for _, k := range keys {
		next, err := writer.Get(ctx, k, func(context.Context) (int64, error) { return db.Load(), nil })
		if err != nil {
			t.Fatal(err)
		}
		if next != want {
			t.Fatalf("after Invalidate, Get %s = %d, want %d (control %v)", k, next, want, control)
		}
	}
	if control {
		return
	}
	if r := reader.Stats().FillsRejected; r != uint64(len(keys)) {
		t.Fatalf("FillsRejected = %d, want %d", r, len(keys))
	}
}

// TestClusterInvalidatePrefix: InvalidatePrefix scans every master and
// deletes the 3,000 keys under the prefix, wherever they live, returns
// that count, and leaves the keys outside it.
func TestClusterInvalidatePrefix(t *testing.T) {
	addrs := clusterAddrs(t)
	cc := clusterClient(t, addrs)
	c := clusterCache[string](t, cc, nil)
	ctx := context.Background()
	p := uniquePrefix()
	prefix := p + "users:"
	var inside, outside []string
	for i := 0; i < 3000; i++ {
		inside = append(inside, fmt.Sprintf("%s%d", prefix, i))
	}
	for i := 0; i < 500; i++ {
		outside = append(outside, fmt.Sprintf("%susersx:%d", p, i), fmt.Sprintf("%sorders:%d", p, i))
	}
	// A prefix with glob characters is taken literally: "we[ir]d*:" must
	// not match "weid…:" keys.
	globPrefix := p + "we[ir]d*:"
	var globInside []string
	for i := 0; i < 10; i++ {
		globInside = append(globInside, fmt.Sprintf("%s%d", globPrefix, i))
		outside = append(outside, fmt.Sprintf("%sweidzz:%d", p, i))
	}
	all := append(append(append([]string{}, inside...), outside...), globInside...)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(all); i += 8 {
				if err := c.Set(ctx, all[i], "v"); err != nil {
					errs <- fmt.Errorf("Set %s: %w", all[i], err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	onEveryMaster(t, "keys under the prefix", keysPerMaster(t, cc, wire.EscapeGlob(prefix)+"*"))
	if total := totalKeys(keysPerMaster(t, cc, wire.EscapeGlob(p)+"*")); total != len(all) {
		t.Fatalf("%d keys written, want %d", total, len(all))
	}

	t0 := time.Now()
	n, err := c.InvalidatePrefix(ctx, prefix)
	if err != nil || n != int64(len(inside)) {
		t.Fatalf("InvalidatePrefix = %d, %v; want %d, nil", n, err, len(inside))
	}
	t.Logf("InvalidatePrefix deleted %d keys on 3 masters in %v", n, time.Since(t0))
	if left := keysPerMaster(t, cc, wire.EscapeGlob(prefix)+"*"); totalKeys(left) != 0 {
		t.Fatalf("keys left under the prefix: %v", left)
	}
	n, err = c.InvalidatePrefix(ctx, globPrefix)
	if err != nil || n != int64(len(globInside)) {
		t.Fatalf("InvalidatePrefix(%q) = %d, %v; want %d, nil", globPrefix, n, err, len(globInside))
	}
	if total := totalKeys(keysPerMaster(t, cc, wire.EscapeGlob(p)+"*")); total != len(outside) {
		t.Fatalf("%d keys left in all, want the %d outside the prefixes", total, len(outside))
	}
	if got, want := c.Stats().Invalidations, uint64(len(inside)+len(globInside)); got != want {
		t.Fatalf("Stats.Invalidations = %d, want %d", got, want)
	}
	for _, k := range outside {
		if cc.Exists(ctx, k).Val() != 1 {
			t.Fatalf("%s, outside the prefix, was deleted", k)
		}
	}
	var cnt counter
	if v, err := c.Get(ctx, outside[0], cnt.load("reloaded", 0)); err != nil || v != "v" || cnt.calls.Load() != 0 {
		t.Fatalf("Get outside the prefix = %q, %v, %d loads; want the cached v", v, err, cnt.calls.Load())
	}
	if v, err := c.Get(ctx, inside[0], cnt.load("reloaded", 0)); err != nil || v != "reloaded" || cnt.calls.Load() != 1 {
		t.Fatalf("Get under the prefix = %q, %v, %d loads; want a reload", v, err, cnt.calls.Load())
	}

	// A wrapper that hides ForEachMaster: once a CROSSSLOT reply shows that
	// it shards, InvalidatePrefix refuses instead of scanning one node.
	w, err := New[string](hideNodes{cc}, &Options[string]{Degradation: Degradation{OpTimeout: 2 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := GetMany(ctx, w, []int{0, 1, 2, 3}, func(i int) string { return inside[i] }, func(_ context.Context, ids []int) (map[int]string, error) {
		return map[int]string{}, nil
	}); err != nil {
		t.Fatalf("GetMany through the wrapper: %v", err)
	}
	if !w.splitReads.Load() {
		t.Fatal("GetMany across slots through the wrapper did not see CROSSSLOT")
	}
	if _, err := w.InvalidatePrefix(ctx, prefix); !errors.Is(err, errShardedScan) {
		t.Fatalf("InvalidatePrefix through a sharding wrapper = %v, want errShardedScan", err)
	}
}

// hideNodes is a user's wrapper of a cluster client that exposes only the
// Redis interface.
type hideNodes struct{ Redis }

// TestClusterNamespace: a namespaced cache on a cluster. Every key of a
// namespace and its generation key share one slot, so the Get's MGET (and
// any MGET over the namespace) works; namespaces spread over the masters;
// InvalidateNamespace drops one namespace, leaves the others, and revokes
// a load in flight; Set in a namespace (a two-key script) works.
func TestClusterNamespace(t *testing.T) {
	addrs := clusterAddrs(t)
	cc := clusterClient(t, addrs)
	c := clusterCache[string](t, cc, &Options[string]{Namespaced: true})
	ctx := context.Background()
	ksName := strings.ReplaceAll(strings.Trim(uniquePrefix(), ":"), ":", "-")
	ks := MustKeyspace(ksName, 1)
	org := func(i int) Namespace { return ks.Namespace("org", fmt.Sprint(i)) }
	var spaces []Namespace // one namespace on each master
	for _, i := range onePerMaster(t, cc, func(i int) string { return org(i).Key("page", "0") }) {
		spaces = append(spaces, org(i))
	}
	sm := newSlotMap(t, cc)
	const pages = 20
	keysOf := func(ns Namespace) []string {
		var keys []string
		for i := 0; i < pages; i++ {
			keys = append(keys, ns.Key("status", "open", "page", fmt.Sprint(i)))
		}
		return keys
	}

	// Same slot: every key of a namespace and its generation key.
	masters := map[string]bool{}
	for _, ns := range spaces {
		slot := sm.slot(t, ns.genKey())
		for _, k := range keysOf(ns) {
			if s := sm.slot(t, k); s != slot {
				t.Fatalf("%s in slot %d, its generation key %s in slot %d", k, s, ns.genKey(), slot)
			}
		}
		masters[sm.master(t, ns.genKey())] = true
	}
	if len(masters) != 3 {
		t.Fatalf("namespaces on %d masters, want 3", len(masters))
	}

	var calls atomic.Int64
	load := func(v string) Loader[string] {
		return func(context.Context) (string, error) { calls.Add(1); return v, nil }
	}
	getAll := func(ns Namespace, v string) {
		t.Helper()
		for _, k := range keysOf(ns) {
			got, err := c.Get(ctx, k, load(v))
			if err != nil || got != v {
				t.Fatalf("Get %s = %q, %v; want %q", k, got, err, v)
			}
		}
	}
	for round := 0; round < 2; round++ {
		for _, ns := range spaces {
			getAll(ns, "v1")
		}
	}
	if n := calls.Load(); n != 3*pages {
		t.Fatalf("%d loads for %d keys read twice; want %d", n, 3*pages, 3*pages)
	}
	if s := c.Stats(); s.Hits != 3*pages || s.RedisErrors != 0 {
		t.Fatalf("stats %+v; want %d hits and no Redis errors", s, 3*pages)
	}

	// One MGET over a whole namespace, sent straight to the node that
	// serves it: a plain client gets CROSSSLOT if the keys span slots.
	for _, ns := range spaces {
		node := redis.NewClient(&redis.Options{Addr: sm.master(t, ns.genKey())})
		vals, err := node.MGet(ctx, append(keysOf(ns), ns.genKey())...).Result()
		if err != nil {
			_ = node.Close()
			t.Fatalf("MGET over namespace %s on its node: %v", ns, err)
		}
		for i, v := range vals {
			if v == nil {
				_ = node.Close()
				t.Fatalf("MGET over namespace %s: value %d absent", ns, i)
			}
		}
		// The control: two namespaces' keys in one MGET are refused.
		err = node.MGet(ctx, keysOf(ns)[0], keysOf(spaces[0])[0], keysOf(spaces[1])[0]).Err()
		_ = node.Close()
		if err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
			t.Fatalf("MGET across namespaces = %v, want CROSSSLOT", err)
		}
	}

	// Invalidate one namespace: its keys reload, the others still hit.
	if err := c.InvalidateNamespace(ctx, spaces[0]); err != nil {
		t.Fatalf("InvalidateNamespace: %v", err)
	}
	getAll(spaces[0], "v2")
	getAll(spaces[1], "v1")
	getAll(spaces[2], "v1")
	if n := calls.Load(); n != 4*pages {
		t.Fatalf("%d loads after one bump, want %d", n, 4*pages)
	}
	if s := c.Stats(); s.NamespaceBumps != 1 {
		t.Fatalf("NamespaceBumps = %d, want 1", s.NamespaceBumps)
	}

	// A load in flight during the bump cannot fill.
	other := clusterCache[string](t, clusterClient(t, addrs), &Options[string]{Namespaced: true})
	key := spaces[1].Key("live")
	inLoad, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(resume) }) }
	defer release()
	got := make(chan string, 1)
	go func() {
		v, err := c.Get(ctx, key, func(ctx context.Context) (string, error) {
			close(inLoad)
			select {
			case <-resume:
			case <-ctx.Done():
				return "", ctx.Err()
			}
			return "old", nil
		})
		if err != nil {
			t.Errorf("reader Get: %v", err)
		}
		got <- v
	}()
	<-inLoad
	if err := other.InvalidateNamespace(ctx, spaces[1]); err != nil {
		t.Fatal(err)
	}
	release()
	if v := <-got; v != "old" {
		t.Fatalf("reader got %q, want the value it loaded", v)
	}
	if v, err := other.Get(ctx, key, load("new")); err != nil || v != "new" {
		t.Fatalf("Get after the bump = %q, %v; want new (the stale fill was accepted)", v, err)
	}
	if r := c.Stats().FillsRejected; r != 1 {
		t.Fatalf("FillsRejected = %d, want 1", r)
	}

	// Write-through in a namespace (set.lua, two keys of one slot).
	setKey := spaces[2].Key("set")
	if err := c.Set(ctx, setKey, "written"); err != nil {
		t.Fatalf("Set in a namespace: %v", err)
	}
	if v, err := other.Get(ctx, setKey, load("loaded")); err != nil || v != "written" {
		t.Fatalf("Get after Set = %q, %v; want written", v, err)
	}
	if s := c.Stats(); s.RedisErrors != 0 {
		t.Fatalf("Redis errors on the cluster: %+v", s)
	}
}

// TestClusterGetMany: batches whose keys live on every master read in one
// pipeline, load their misses with one loader call, and across four
// instances each id is loaded once; ids the loader leaves out are cached
// as tombstones on whichever master owns them.
func TestClusterGetMany(t *testing.T) {
	addrs := clusterAddrs(t)
	ctx := context.Background()
	p := uniquePrefix()
	key := func(id int) string { return fmt.Sprintf("%sitem:%d", p, id) }
	caches := make([]*Cache[string], 4)
	for i := range caches {
		caches[i] = clusterCache[string](t, clusterClient(t, addrs), nil)
	}
	const n = 90
	perID := make([]atomic.Int64, n)
	var calls atomic.Int64
	load := func(_ context.Context, ids []int) (map[int]string, error) {
		calls.Add(1)
		time.Sleep(20 * time.Millisecond)
		m := make(map[int]string, len(ids))
		for _, id := range ids {
			perID[id].Add(1)
			if id%10 != 9 { // ids ending in 9 do not exist
				m[id] = fmt.Sprint("v", id)
			}
		}
		return m, nil
	}
	var wg sync.WaitGroup
	for _, c := range caches {
		for g := range 4 {
			wg.Go(func() {
				batch := ids(n)
				rand.Shuffle(len(batch), func(i, j int) { batch[i], batch[j] = batch[j], batch[i] })
				got, err := GetMany(ctx, c, batch[:60+g*10], key, load)
				if err != nil {
					t.Errorf("GetMany: %v", err)
					return
				}
				for _, id := range batch[:60+g*10] {
					if v, ok := got[id]; ok != (id%10 != 9) || (ok && v != fmt.Sprint("v", id)) {
						t.Errorf("id %d: %q, %v", id, v, ok)
					}
				}
			})
		}
	}
	wg.Wait()
	for id := range perID {
		if c := perID[id].Load(); c != 1 {
			t.Errorf("id %d loaded %d times, want once across 16 batches on 4 instances", id, c)
		}
	}
	onEveryMaster(t, "cached entries", keysPerMaster(t, clusterClient(t, addrs), wire.EscapeGlob(p)+"*"))
	before := calls.Load()
	got, err := GetMany(ctx, caches[0], ids(n), key, load)
	if err != nil || len(got) != n-n/10 || calls.Load() != before {
		t.Fatalf("all-hit batch: %d values, %v, %d more loader calls", len(got), err, calls.Load()-before)
	}
	if s := caches[0].Stats(); s.RedisErrors != 0 {
		t.Fatalf("stats %+v: Redis errors on the cluster", s)
	}
}

// TestClusterLocalTier: the local tier's bus works through a cluster
// client: an Invalidate, a Set and a prefix invalidation on one instance
// reach the other's local tier.
func TestClusterLocalTier(t *testing.T) {
	addrs := clusterAddrs(t)
	ctx := context.Background()
	p := uniquePrefix()
	o := func() *Options[string] {
		return &Options[string]{Local: &LocalOptions{TTL: time.Hour, Channel: p + "bus"}}
	}
	c1 := clusterCache(t, clusterClient(t, addrs), o())
	c2 := clusterCache(t, clusterClient(t, addrs), o())
	waitFor(t, "both subscriptions", func() bool { return c1.local.live.Load() && c2.local.live.Load() })
	version := 0
	load := func(context.Context) (string, error) { return fmt.Sprint("v", version), nil }
	keys := []string{p + "item:1", p + "item:2", p + "item:3"}
	warm := func() {
		t.Helper()
		for _, k := range keys {
			for range 2 {
				if _, err := c2.Get(ctx, k, load); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	sees := func(what, k, want string) {
		t.Helper()
		waitFor(t, what+" to reach the other instance", func() bool {
			v, err := c2.Get(ctx, k, load)
			return err == nil && v == want
		})
	}
	warm()
	version++
	if _, err := c1.Invalidate(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	sees("Invalidate", keys[0], "v1")
	if err := c1.Set(ctx, keys[1], "set"); err != nil {
		t.Fatal(err)
	}
	sees("Set", keys[1], "set")
	version++
	if _, err := c1.InvalidatePrefix(ctx, p+"item:"); err != nil {
		t.Fatal(err)
	}
	sees("InvalidatePrefix", keys[2], "v2")
	if s := c2.Stats(); s.LocalHits == 0 || s.BusMessages < 3 {
		t.Fatalf("stats %+v: no local hits or too few bus messages", s)
	}
}

// TestClusterPerEntry: SetMany on a cluster writes keys of every master
// in its pipelined rounds (a namespaced cache too); Peek reads each back;
// GetOptions Reload and TTL work there as on one node.
func TestClusterPerEntry(t *testing.T) {
	addrs := clusterAddrs(t)
	cc := clusterClient(t, addrs)
	ctx := context.Background()
	p := uniquePrefix()
	c := clusterCache[string](t, cc, &Options[string]{Policy: Policy{TTL: time.Hour}})
	vals := map[string]string{}
	for i := range 300 {
		vals[fmt.Sprintf("%swarm:%d", p, i)] = strconv.Itoa(i)
	}
	if wrote, err := c.SetMany(ctx, vals); wrote != len(vals) || err != nil {
		t.Fatalf("SetMany = %d, %v", wrote, err)
	}
	onEveryMaster(t, "warmed keys", keysPerMaster(t, cc, wire.EscapeGlob(p)+"warm:*"))
	for k, v := range vals {
		if pk, err := c.Peek(ctx, k); err != nil || pk.State != "fresh" || pk.Value != v || pk.Written.IsZero() || pk.Age < 0 || pk.Age > time.Minute {
			t.Fatalf("Peek %s = %+v, %v", k, pk, err)
		}
	}
	key := p + "reload"
	var version atomic.Int64
	load := func(context.Context) (string, error) { return strconv.FormatInt(version.Load(), 10), nil }
	if v, err := c.Get(ctx, key, load, GetOptions{TTL: time.Minute}); err != nil || v != "0" {
		t.Fatal(v, err)
	}
	if d := cc.PTTL(ctx, key).Val(); d <= 0 || d > time.Minute {
		t.Fatalf("a TTL of 1m: the key lives %v", d)
	}
	version.Store(1)
	if v, err := c.Get(ctx, key, load, GetOptions{Reload: true}); err != nil || v != "1" {
		t.Fatalf("Reload = %q, %v", v, err)
	}

	ns := clusterCache[string](t, cc, &Options[string]{Name: "ns", Namespaced: true})
	space := MustKeyspace("perentry", 1)
	nvals := map[string]string{}
	for i := range 30 {
		nvals[space.Namespace(p, strconv.Itoa(i%3)).Key(strconv.Itoa(i))] = strconv.Itoa(i)
	}
	if wrote, err := ns.SetMany(ctx, nvals); wrote != len(nvals) || err != nil {
		t.Fatalf("namespaced SetMany = %d, %v", wrote, err)
	}
	for k, v := range nvals {
		if pk, err := ns.Peek(ctx, k); err != nil || pk.State != "fresh" || pk.Value != v {
			t.Fatalf("Peek %s = %+v, %v", k, pk, err)
		}
	}
}

// Tags and Clear on a Cluster: the entries, their tags' generations and
// the Clear generation sit on different masters; InvalidateTags and Clear
// reload exactly what they cover, through Get and GetMany, and local tiers
// in another process follow. It logs what a tagged hit costs beside a
// plain one here (alternating, sequential).
func TestClusterTags(t *testing.T) {
	addrs := clusterAddrs(t)
	ctx := context.Background()
	p := uniquePrefix()
	opts := func() *Options[string] {
		return &Options[string]{Name: "tags", Tags: pageTags(p), Clearable: true, Policy: Policy{TTL: time.Hour},
			Local: &LocalOptions{TTL: time.Hour, Channel: p + "bus"}}
	}
	c1 := clusterCache(t, clusterClient(t, addrs), opts())
	c2 := clusterCache(t, clusterClient(t, addrs), opts())
	for _, c := range []*Cache[string]{c1, c2} {
		if err := c.WaitLocal(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var keys []string
	for i := range 60 {
		keys = append(keys, fmt.Sprintf("%spage:%s:%s:%d", p, []string{"a", "b", "c"}[i%3], []string{"x", "y"}[i%2], i))
	}
	var l loadsOf
	getAll := func(c *Cache[string]) map[string]int {
		t.Helper()
		for _, k := range keys {
			if _, err := c.Get(ctx, k, l.loader(k)); err != nil {
				t.Fatal(err)
			}
		}
		return l.take()
	}
	count := func(m map[string]int) int {
		n := 0
		for _, v := range m {
			n += v
		}
		return n
	}
	if n := count(getAll(c1)); n != 60 {
		t.Fatalf("first Gets: %d loads, want 60", n)
	}
	cc := clusterClient(t, addrs)
	onEveryMaster(t, "entries", keysPerMaster(t, cc, wire.EscapeGlob(p)+"page:*"))
	masters := map[string]bool{}
	for _, k := range []string{c1.tagKey(p + "org:a"), c1.tagKey(p + "org:b"), c1.tagKey(p + "org:c"), c1.tagKey(p + "user:x"), c1.tagKey(p + "user:y"), c1.clearKey()} {
		m, err := cc.MasterForKey(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		masters[m.Options().Addr] = true
	}
	if len(masters) < 2 {
		t.Fatalf("the tag generations all sit on one master (%v): the test shows nothing about cross-slot reads", masters)
	}
	if n := count(getAll(c2)); n != 0 {
		t.Fatalf("Gets in another process: %d loads, want 0", n)
	}
	l.version.Store(1)
	if err := c1.InvalidateTags(ctx, p+"org:a"); err != nil {
		t.Fatal(err)
	}
	got := getAll(c1)
	for k := range got {
		if !strings.Contains(k, "page:a:") {
			t.Fatalf("InvalidateTags(org:a) reloaded %s", k)
		}
	}
	if count(got) != 20 {
		t.Fatalf("InvalidateTags(org:a): %d loads, want 20", count(got))
	}
	waitFor(t, "the other process's local tier to drop org a's pages", func() bool {
		for _, k := range keys {
			v, err := c2.Get(ctx, k, noLoad)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(k, "page:a:") != strings.HasSuffix(v, "@1") {
				return false
			}
		}
		return true
	})
	if err := c2.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	vals, err := GetMany(ctx, c2, keys, func(k string) string { return k }, func(_ context.Context, ids []string) (map[string]string, error) {
		m := map[string]string{}
		for _, k := range ids {
			m[k], _ = l.loader(k)(ctx)
		}
		return m, nil
	})
	if err != nil || len(vals) != 60 {
		t.Fatal(len(vals), err)
	}
	if n := count(l.take()); n != 60 {
		t.Fatalf("GetMany after Clear: %d loads, want 60", n)
	}

	// What a tagged hit costs here: two tags and Clear's generation, read
	// with the entry in one pipeline.
	plain := clusterCache(t, clusterClient(t, addrs), &Options[string]{Name: "plain", Policy: Policy{TTL: time.Hour}})
	tagged := clusterCache(t, clusterClient(t, addrs), &Options[string]{Name: "tags", Tags: pageTags(p), Clearable: true, Policy: Policy{TTL: time.Hour}})
	pk := p + "plain:1"
	if _, err := plain.Get(ctx, pk, l.loader(pk)); err != nil {
		t.Fatal(err)
	}
	var dp, dt time.Duration
	for range 1000 {
		t0 := time.Now()
		if _, err := plain.Get(ctx, pk, noLoad); err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		if _, err := tagged.Get(ctx, keys[0], noLoad); err != nil {
			t.Fatal(err)
		}
		dp, dt = dp+t1.Sub(t0), dt+time.Since(t1)
	}
	t.Logf("Cluster, sequential hits: plain %v, tagged (2 tags and Clear, 3 masters) %v: %.2fx", dp/1000, dt/1000, float64(dt)/float64(dp))
}
