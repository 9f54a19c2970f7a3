package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The write tests pause Redis's writes (CLIENT PAUSE ... WRITE, which
// miniredis lacks) on a redis-server of their own, so no other test's
// Redis is paused. With REDIS_URL set (CI) redis-server is required; on a
// machine with Go alone they are skipped.

// ownRedis starts a redis-server of the test's own on a free loopback
// port and stops it (by pid) when the test ends. Without redis-server on
// PATH it skips the test on a machine with Go alone, and fails it when
// REDIS_URL or CACHEASIDE_REDIS_FAULTS says Redis is there (CI).
func ownRedis(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("REDIS_URL") != "" || os.Getenv(envFaults) != "" {
			t.Fatalf("REDIS_URL or %s is set, so this test needs redis-server on PATH: %v", envFaults, err)
		}
		t.Skip("needs redis-server on PATH")
	}
	// A free port can be taken between the probe and the bind (by another
	// test's server, or as the local port of a connection): the server
	// then exits, and it is tried again on another port.
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		var addr string
		if addr, err = startOwnRedis(t); err == nil {
			return addr
		}
	}
	t.Fatal(err)
	return ""
}

// startOwnRedis starts one redis-server on a free port and waits until
// the server there answers as itself (its pid, not another's).
func startOwnRedis(t *testing.T) (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	var out bytes.Buffer
	cmd := exec.Command("redis-server", "--port", fmt.Sprint(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop := func() { _ = cmd.Process.Kill(); <-exited }
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer rdb.Close()
	pid := fmt.Sprintf("process_id:%d\r\n", cmd.Process.Pid)
	for deadline := time.Now().Add(10 * time.Second); ; {
		info, err := rdb.Info(context.Background(), "server").Result()
		if err == nil && strings.Contains(info, pid) {
			t.Cleanup(stop)
			return addr, nil
		}
		select {
		case <-exited:
			return "", fmt.Errorf("redis-server on %s exited at start: %s", addr, out.String())
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return "", fmt.Errorf("redis-server on %s did not answer as itself within 10s (last error %v)", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// twoInstances starts two instances of the app on one database (the
// PostgreSQL at DATABASE_URL, else an SQLite file) and one Redis, sharing
// their keys and invalidation bus as two processes of one deployment do.
func twoInstances(t *testing.T, redisAddr string) [2]*testApp {
	t.Helper()
	e := env{redisURL: "redis://" + redisAddr + "/0"}
	if base := os.Getenv("DATABASE_URL"); base != "" {
		e.databaseURL, _ = pgSchema(t, base)
	} else {
		e.databaseURL = "sqlite:" + filepath.Join(t.TempDir(), "tasks.db")
	}
	var out [2]*testApp
	for i := range out {
		a, err := newApp(context.Background(), e, slog.New(slog.DiscardHandler), 0, "w.")
		if err != nil {
			t.Fatal(err)
		}
		ta := &testApp{app: a}
		ta.srv = httptest.NewServer(a.Handler)
		t.Cleanup(func() { ta.srv.Close(); a.Close() })
		out[i] = ta
	}
	for _, ta := range out {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := ta.svc.tasks.WaitLocal(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func (ta *testApp) title(t *testing.T, id int64) string {
	t.Helper()
	code, b := ta.do(t, "GET", fmt.Sprintf("/tasks/%d", id), "")
	if code != 200 {
		t.Fatalf("GET /tasks/%d = %d %s", id, code, b)
	}
	var task Task
	if err := json.Unmarshal(b, &task); err != nil {
		t.Fatal(err)
	}
	return task.Title
}

func (ta *testApp) put(t *testing.T, task Task, title string) *http.Response {
	t.Helper()
	body := fmt.Sprintf(`{"title":%q,"status":%q,"assignee_id":%d}`, title, task.Status, task.Assignee)
	req, _ := http.NewRequest("PUT", fmt.Sprintf("%s/tasks/%d", ta.srv.URL, task.ID), strings.NewReader(body))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("PUT /tasks/%d = %d", task.ID, res.StatusCode)
	}
	return res
}

// A PUT while Redis refuses writes: it succeeds (the row is committed),
// says its invalidation is queued, the writing instance reads its own write
// at once, and both instances serve the new title once Redis answers.
func TestPutDuringWritePause(t *testing.T) {
	addr := ownRedis(t)
	apps := twoInstances(t, addr)
	task, err := apps[0].store.GetTask(context.Background(), 7)
	if err != nil {
		t.Fatal(err)
	}
	for _, ta := range apps { // cached in Redis and in both local tiers
		ta.title(t, 7)
		ta.title(t, 7)
	}
	admin := redis.NewClient(&redis.Options{Addr: addr})
	defer admin.Close()
	const pause = 800 * time.Millisecond
	if err := admin.Do(context.Background(), "CLIENT", "PAUSE", pause.Milliseconds(), "WRITE").Err(); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	res := apps[0].put(t, task, "written during the pause")
	if res.Header.Get("Cache-Invalidation") != "queued" {
		t.Fatalf("PUT during the pause: Cache-Invalidation %q, want queued", res.Header.Get("Cache-Invalidation"))
	}
	if time.Since(paused) >= pause {
		t.Skipf("the PUT took the whole pause (%v): the machine is too slow to see the pause", time.Since(paused))
	}
	if got := apps[0].title(t, 7); got != "written during the pause" {
		t.Fatalf("the writing instance read %q during the pause, want its own write", got)
	}
	// Once Redis takes writes again, the queued invalidation lands and
	// both instances serve the new title.
	deadline := paused.Add(pause + 5*time.Second)
	for i, ta := range apps {
		for ta.title(t, 7) != "written during the pause" {
			if time.Now().After(deadline) {
				t.Fatalf("instance %d still serves the old title %v after the pause ended", i, time.Since(paused)-pause)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if s := apps[0].svc.tasks.Stats(); s.QueuedInvals == 0 || s.RetriedInvals == 0 {
		t.Fatalf("stats %+v: want the invalidation queued and retried", s)
	}
}

// A storm: writers and readers on both instances while Redis's writes are
// paused again and again. Afterwards every task reads the same as its
// database row through either instance, and no read on the writing
// instance that started after a PUT returned saw an older version.
func TestWriteStormWithPauses(t *testing.T) {
	addr := ownRedis(t)
	apps := twoInstances(t, addr)
	admin := redis.NewClient(&redis.Options{Addr: addr})
	defer admin.Close()
	ctx := context.Background()
	const tasks = 8
	storm := 2500 * time.Millisecond
	if testing.Short() {
		storm = time.Second
	}
	base := make([]Task, tasks+1)
	for id := int64(1); id <= tasks; id++ {
		var err error
		if base[id], err = apps[0].store.GetTask(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	// written[i][id] is the newest version a PUT through instance i has
	// returned for task id.
	var written [2][tasks + 1]atomic.Int64
	var violations atomic.Int64
	var firstViolation atomic.Value
	version := func(title string) int64 {
		var v int64
		if _, err := fmt.Sscanf(title, "v%d", &v); err != nil {
			return 0 // the seed title
		}
		return v
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// One writer per task, so a task's versions rise in order; each PUT
	// goes through one instance or the other.
	for id := int64(1); id <= tasks; id++ {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(id), 7))
			for v := int64(1); ; v++ {
				select {
				case <-stop:
					return
				default:
				}
				i := rng.IntN(2)
				apps[i].put(t, base[id], fmt.Sprintf("v%d", v))
				written[i][id].Store(v)
				time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
			}
		})
	}
	// Readers on both instances: a read on instance i that starts after a
	// PUT through i returned version v must see v or newer.
	for i := range apps {
		for r := range 2 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(i), uint64(r)))
				for {
					select {
					case <-stop:
						return
					default:
					}
					id := int64(1 + rng.IntN(tasks))
					floor := written[i][id].Load()
					if got := version(apps[i].title(t, id)); got < floor {
						violations.Add(1)
						firstViolation.CompareAndSwap(nil, fmt.Sprintf("instance %d, task %d: read v%d after a PUT through it returned v%d", i, id, got, floor))
					}
				}
			})
		}
	}
	// Redis refuses writes for 400 ms every 700 ms: longer than the write
	// budget (WriteTimeout, 250 ms), so invalidations fail and are queued.
	var pauses int
	deadline := time.Now().Add(storm)
	for time.Now().Before(deadline) {
		if err := admin.Do(ctx, "CLIENT", "PAUSE", 400, "WRITE").Err(); err != nil {
			t.Fatal(err)
		}
		pauses++
		time.Sleep(700 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if n := violations.Load(); n > 0 {
		t.Fatalf("%d reads on the writing instance saw an older version than its own PUT; first: %v", n, firstViolation.Load())
	}
	// Quiescence: the queued invalidations land, the local tiers follow.
	settle := time.Now().Add(10 * time.Second)
	for _, ta := range apps {
		for ta.svc.tasks.Stats().PendingInvals > 0 || ta.svc.lists.Stats().PendingInvals > 0 {
			if time.Now().After(settle) {
				t.Fatal("invalidations still pending 10 s after the storm")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	time.Sleep(localTaskTTL) // a lost bus message is bounded by the local TTL
	var queued uint64
	for i, ta := range apps {
		queued += ta.svc.tasks.Stats().QueuedInvals
		for id := int64(1); id <= tasks; id++ {
			row, err := ta.store.GetTask(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if got := ta.title(t, id); got != row.Title {
				t.Errorf("after the storm, instance %d serves task %d as %q; the database has %q", i, id, got, row.Title)
			}
		}
	}
	t.Logf("storm: %v, %d write pauses, %d invalidations queued and retried", storm, pauses, queued)
	if queued == 0 {
		t.Fatal("no invalidation met a pause: the storm tested nothing")
	}
}
