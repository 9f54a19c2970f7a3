package cacheaside

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// The cross-process stampede, with real processes: BenchmarkStampedeProcs
// starts 4 copies of the test binary (TestStampedeChild), each a Cache on
// its own client, and, with CACHEASIDE_STAMPEDE_BUSY=n, n CPU-bound
// neighbours (more copies, spinning), so the processes compete for the
// cores as they would on a busy host. Each iteration is one rep: every
// process runs 250 Gets of one new key at once, with a 50ms loader.
//
//	CACHEASIDE_REDIS_ADDR=127.0.0.1:6379 CACHEASIDE_STAMPEDE_BUSY=2 \
//	  go test -run '^$' -bench StampedeProcs -benchtime 20x .
//
// With CACHEASIDE_STAMPEDE_QUOTA=n the processes and the neighbours run in
// a cgroup limited to n% of one core (cpu.cfs_quota_us per 100ms period on
// cgroup v1, cpu.max on v2): the kernel freezes them all for the rest of a
// period once the quota is spent, as it throttles a container at its CPU
// limit. It needs root and a writable cgroup file system, and fails
// otherwise. With CACHEASIDE_STAMPEDE_COLD=1 each rep has processes of its own, as
// after a deploy: their clients have no command connection yet, so the
// Gets' first commands dial. It reports the loads per rep (mean and most), the reps with one load, the
// p50, p99 and max of all Gets, and logs each rep's loads and each
// process's Stats at the end (what explains an extra load: Redis errors,
// skipped commands, waits).
const (
	envStampedeChild = "CACHEASIDE_STAMPEDE_CHILD" // the Redis address (a process), or "busy" (a neighbour)
	envStampedeBusy  = "CACHEASIDE_STAMPEDE_BUSY"  // how many CPU-bound neighbours to start
	envStampedeLocal = "CACHEASIDE_STAMPEDE_LOCAL" // "1": the processes' caches have a local tier
	envStampedeCold  = "CACHEASIDE_STAMPEDE_COLD"  // "1": new processes for each rep (cold clients: the Gets dial)
	envStampedeQuota = "CACHEASIDE_STAMPEDE_QUOTA" // n: the processes and neighbours share a CPU quota of n% of one core, as in a throttled container
	stampedeProcs    = 4
	stampedeGets     = 250
	stampedeLoad     = 50 * time.Millisecond
	stampedeTag      = "STAMPEDE "
)

// busySink keeps a neighbour's loop from being a loop that does nothing.
var busySink atomic.Uint64

// stampedeRep is what one process reports of one rep.
type stampedeRep struct {
	Loads int64   `json:"loads"`
	Lat   []int64 `json:"lat"` // nanoseconds, one per Get
	Errs  int     `json:"errs"`
}

// TestStampedeChild is a process of BenchmarkStampedeProcs; it does
// nothing unless the benchmark started it.
func TestStampedeChild(t *testing.T) {
	mode := os.Getenv(envStampedeChild)
	switch mode {
	case "":
		t.Skip("a process of BenchmarkStampedeProcs")
	case "busy":
		for n := uint64(0); ; n++ { // a CPU-bound neighbour, until killed
			busySink.Store(n)
		}
	}
	rdb := redis.NewClient(Recommended(&redis.Options{Addr: mode}))
	defer rdb.Close()
	o := &Options[string]{Name: "stampede-procs"}
	if os.Getenv(envStampedeLocal) == "1" {
		o.Local = &LocalOptions{}
	}
	c, err := New(rdb, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for c.wake == nil || !c.wake.live.Load() || (c.local != nil && !c.local.live.Load()) {
		time.Sleep(time.Millisecond)
	}
	out := bufio.NewWriter(os.Stdout)
	say := func(v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(out, "%s%s\n", stampedeTag, b)
		_ = out.Flush()
	}
	say("ready")
	var loads atomic.Int64
	load := func(context.Context) (string, error) {
		loads.Add(1)
		time.Sleep(stampedeLoad)
		return "v", nil
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		key := in.Text()
		loads.Store(0)
		rep := stampedeRep{Lat: make([]int64, stampedeGets)}
		var errs atomic.Int64
		var wg sync.WaitGroup
		for g := range stampedeGets {
			wg.Go(func() {
				t0 := time.Now()
				if _, err := c.Get(context.Background(), key, load); err != nil {
					errs.Add(1)
				}
				rep.Lat[g] = int64(time.Since(t0))
			})
		}
		wg.Wait()
		rep.Loads, rep.Errs = loads.Load(), int(errs.Load())
		say(rep)
	}
	say(c.Stats())
}

// stampedeProc is a running process of the benchmark.
type stampedeProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// stampedeGroup is the cgroup the processes run in (""; none).
var stampedeGroup string

// quotaGroup makes a cgroup limited to percent% of one core and returns
// the file a process joins it by; it is removed at the end of b.
func quotaGroup(b *testing.B, percent int) string {
	name := fmt.Sprintf("cacheaside-stampede-%d", os.Getpid())
	period, quota := 100_000, percent*1000
	if _, err := os.Stat("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"); err == nil { // cgroup v1
		dir := "/sys/fs/cgroup/cpu/" + name
		if err := os.Mkdir(dir, 0o755); err != nil {
			b.Fatalf("%s: %v (needs root and a writable cgroup file system)", envStampedeQuota, err)
		}
		b.Cleanup(func() { _ = os.Remove(dir) })
		for file, v := range map[string]int{"cpu.cfs_period_us": period, "cpu.cfs_quota_us": quota} {
			if err := os.WriteFile(dir+"/"+file, []byte(strconv.Itoa(v)), 0o644); err != nil {
				b.Fatalf("%s: %v", envStampedeQuota, err)
			}
		}
		return dir + "/cgroup.procs"
	}
	dir := "/sys/fs/cgroup/" + name // cgroup v2
	if err := os.Mkdir(dir, 0o755); err != nil {
		b.Fatalf("%s: %v (needs root and a writable cgroup file system with the cpu controller)", envStampedeQuota, err)
	}
	b.Cleanup(func() { _ = os.Remove(dir) })
	if err := os.WriteFile(dir+"/cpu.max", []byte(fmt.Sprintf("%d %d", quota, period)), 0o644); err != nil {
		b.Fatalf("%s: %v", envStampedeQuota, err)
	}
	return dir + "/cgroup.procs"
}

// startStampedeProc starts a copy of the test binary as mode.
func startStampedeProc(b *testing.B, mode string) *stampedeProc {
	cmd := exec.Command(os.Args[0], "-test.run=^TestStampedeChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), envStampedeChild+"="+mode)
	if mode == "busy" {
		cmd.Env = append(cmd.Env, "GOMAXPROCS=1")
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if stampedeGroup != "" {
		// Joined before it says it is ready, so every rep runs in the group.
		if err := os.WriteFile(stampedeGroup, []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			b.Fatalf("%s: %v", envStampedeQuota, err)
		}
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	return &stampedeProc{cmd: cmd, in: in, out: sc}
}

// next returns the process's next message.
func (p *stampedeProc) next(b *testing.B, v any) {
	for p.out.Scan() {
		if line, ok := strings.CutPrefix(p.out.Text(), stampedeTag); ok {
			if err := json.Unmarshal([]byte(line), v); err != nil {
				b.Fatalf("process %d: %v in %q", p.cmd.Process.Pid, err, line)
			}
			return
		}
	}
	b.Fatalf("process %d ended: %v", p.cmd.Process.Pid, p.out.Err())
}

func BenchmarkStampedeProcs(b *testing.B) {
	addr := os.Getenv(envRedisAddr)
	if addr == "" {
		mr := miniredis.RunT(b)
		addr = mr.Addr()
	}
	stampedeGroup = ""
	if q, _ := strconv.Atoi(os.Getenv(envStampedeQuota)); q > 0 {
		stampedeGroup = quotaGroup(b, q)
		b.Cleanup(func() { stampedeGroup = "" })
	}
	if n, _ := strconv.Atoi(os.Getenv(envStampedeBusy)); n > 0 {
		for range n {
			startStampedeProc(b, "busy")
		}
	}
	cold := os.Getenv(envStampedeCold) == "1"
	start := func() []*stampedeProc {
		procs := make([]*stampedeProc, stampedeProcs)
		for i := range procs {
			procs[i] = startStampedeProc(b, addr)
		}
		for _, p := range procs {
			var ready string
			p.next(b, &ready)
		}
		return procs
	}
	var procs []*stampedeProc
	if !cold {
		procs = start()
	}
	prefix := uniquePrefix() + "stampede:"
	var (
		all      []time.Duration
		perRep   []int64
		errs     int
		overOneS int
		stats    []string
	)
	statsOf := func(procs []*stampedeProc) {
		for _, p := range procs {
			_ = p.in.Close()
			var s Stats
			p.next(b, &s)
			stats = append(stats, fmt.Sprintf("loads %d, misses %d, coalesced %d, lease-contended %d, redis errors %d, starved %d, skipped %d, breaker opens %d",
				s.Loads, s.Misses, s.Coalesced, s.LeaseContended, s.RedisErrors, s.Starved, s.RedisSkipped, s.BreakerOpens))
		}
	}
	i := 0
	for b.Loop() {
		i++
		if cold {
			b.StopTimer()
			procs = start()
			b.StartTimer()
		}
		key := prefix + strconv.Itoa(i)
		for _, p := range procs {
			if _, err := io.WriteString(p.in, key+"\n"); err != nil {
				b.Fatal(err)
			}
		}
		var loads int64
		for _, p := range procs {
			var rep stampedeRep
			p.next(b, &rep)
			loads += rep.Loads
			errs += rep.Errs
			for _, ns := range rep.Lat {
				d := time.Duration(ns)
				all = append(all, d)
				if d > time.Second {
					overOneS++
				}
			}
		}
		perRep = append(perRep, loads)
		if cold && loads > 1 {
			statsOf(procs)
		}
	}
	b.StopTimer()
	if !cold {
		statsOf(procs)
	}
	slices.Sort(all)
	pct := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))]) / 1e6 }
	one, most := 0, int64(0)
	var sum int64
	for _, n := range perRep {
		sum += n
		most = max(most, n)
		if n == 1 {
			one++
		}
	}
	b.ReportMetric(float64(sum)/float64(len(perRep)), "loads/rep")
	b.ReportMetric(float64(most), "max-loads")
	b.ReportMetric(float64(one)/float64(len(perRep)), "one-load-reps")
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(pct(1), "max-ms")
	b.Logf("%d reps, loads per rep %v, %d Gets over 1s, %d errors; busy neighbours %q, CPU quota %q%%, local tier %q, cold %v",
		len(perRep), perRep, overOneS, errs, os.Getenv(envStampedeBusy), os.Getenv(envStampedeQuota), os.Getenv(envStampedeLocal), cold)
	for i, s := range stats {
		b.Logf("process %d: %s", i%stampedeProcs, s) // cold: of the reps with more than one load
	}
	if errs > 0 {
		b.Errorf("%d Gets returned an error", errs)
	}
}
