package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox/pgtest"
)

// The environment of an app instance run as a child process of the test
// binary (TestAppChild), to be killed with SIGKILL.
const (
	envStormDB    = "TASKSERVICE_STORM_DB"
	envStormRedis = "TASKSERVICE_STORM_REDIS"
	envStormAddr  = "TASKSERVICE_STORM_ADDR" // a file the child writes its address to
)

// envFaults makes the storm test required: it starts a redis-server of its
// own (CLIENT PAUSE would stall every other test on a shared one).
const envFaults = "CACHEASIDE_REDIS_FAULTS"

// TestAppChild is one instance of TestAppKilledDuringWriteStorm's app,
// serving until killed; skipped when not started by that test.
func TestAppChild(t *testing.T) {
	db := os.Getenv(envStormDB)
	if db == "" {
		t.Skip("run by TestAppKilledDuringWriteStorm")
	}
	a, err := newApp(context.Background(), env{databaseURL: db, redisURL: os.Getenv(envStormRedis)}, slog.New(slog.DiscardHandler), 0, "storm.")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(os.Getenv(envStormAddr), []byte(l.Addr().String()), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = http.Serve(l, a.Handler) // until killed
}

// TestAppKilledDuringWriteStorm: app instances, each a process of its own,
// take a storm of task writes and reads while Redis refuses writes now and
// then (CLIENT PAUSE … WRITE, so invalidations wait, fail and queue in
// memory), and each is killed with SIGKILL at a random moment and replaced.
// Whatever the kills lost, the outbox's relay (and, on PostgreSQL with
// wal_level=logical, the change data capture listener) applies once the
// last instance runs: its staleness audit then finds nothing stale.
func TestAppKilledDuringWriteStorm(t *testing.T) {
	if os.Getenv(envFaults) != "1" {
		t.Skipf("starts a redis-server of its own: set %s=1", envFaults)
	}
	t.Run("outbox on SQLite", func(t *testing.T) {
		storm(t, "sqlite:"+filepath.Join(t.TempDir(), "tasks.db"))
	})
	t.Run("outbox and change data capture on PostgreSQL", func(t *testing.T) {
		storm(t, pgtest.StartLogical(t))
	})
}

func storm(t *testing.T, database string) {
	redisAddr := ownRedis(t)
	pause := redis.NewClient(&redis.Options{Addr: redisAddr})
	defer pause.Close()
	dir := t.TempDir()
	var cur *exec.Cmd
	var curAddr atomic.Pointer[string]
	start := func(n int) {
		t.Helper()
		addrFile := filepath.Join(dir, fmt.Sprint("addr", n))
		cmd := exec.Command(os.Args[0], "-test.run=^TestAppChild$")
		cmd.Env = append(os.Environ(), envStormDB+"="+database, envStormRedis+"=redis://"+redisAddr+"/0", envStormAddr+"="+addrFile)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(60 * time.Second)
		for {
			if b, err := os.ReadFile(addrFile); err == nil && len(b) > 0 {
				a := string(b)
				curAddr.Store(&a)
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("an app instance did not start within 60s")
			}
			time.Sleep(10 * time.Millisecond)
		}
		cur = cmd
	}
	kill := func() {
		_ = cur.Process.Signal(syscall.SIGKILL)
		_ = cur.Wait()
	}
	start(0)
	defer func() { kill() }()
	client := &http.Client{Timeout: 5 * time.Second}
	call := func(method, path, body string) (int, []byte, error) {
		req, err := http.NewRequest(method, "http://"+*curAddr.Load()+path, strings.NewReader(body))
		if err != nil {
			return 0, nil, err
		}
		res, err := client.Do(req)
		if err != nil {
			return 0, nil, err // the instance was killed under it
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		return res.StatusCode, b, err
	}
	var writes, reads atomic.Int64
	stop, stopReads := make(chan struct{}), make(chan struct{})
	var wg, readers sync.WaitGroup
	for r := range 2 { // readers keep the tasks cached, the stale ones included
		readers.Go(func() {
			for n := r; ; n++ {
				select {
				case <-stopReads:
					return
				default:
				}
				if code, _, err := call("GET", fmt.Sprintf("/tasks/%d", 1+n%40), ""); err == nil && code == 200 {
					reads.Add(1)
				}
			}
		})
	}
	for w := range 4 {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				id := 1 + (w*13+n*7)%40
				code, b, err := call("GET", fmt.Sprintf("/tasks/%d", id), "")
				var task Task
				if err != nil || code != 200 || json.Unmarshal(b, &task) != nil {
					continue
				}
				reads.Add(1)
				body := fmt.Sprintf(`{"title":"storm %d.%d","status":%q,"assignee_id":%d}`, w, n, task.Status, task.Assignee)
				if code, _, err := call("PUT", fmt.Sprintf("/tasks/%d", id), body); err == nil && code == 200 {
					writes.Add(1)
				}
			}
		})
	}
	const kills = 4
	for k := 1; k <= kills; k++ {
		time.Sleep(time.Duration(300+rand.IntN(400)) * time.Millisecond)
		// Writes refused for a while: the instance's invalidations fail and
		// wait in its memory for a retry, and it is killed meanwhile.
		paused := time.Now()
		if err := pause.Do(context.Background(), "CLIENT", "PAUSE", 400, "WRITE").Err(); err != nil {
			t.Fatalf("CLIENT PAUSE: %v", err)
		}
		time.Sleep(time.Duration(100+rand.IntN(250)) * time.Millisecond)
		if k == kills {
			close(stop) // the last kill ends the writes: nothing after it hides what it lost
		}
		kill()
		// The next instance starts once Redis takes writes again, as after
		// a restart: its breaker starts closed, and its reads fill.
		time.Sleep(time.Until(paused.Add(450 * time.Millisecond)))
		start(k)
	}
	wg.Wait()
	time.Sleep(300 * time.Millisecond) // the readers fill what the last writes left out
	close(stopReads)
	readers.Wait()
	if writes.Load() == 0 || reads.Load() == 0 {
		t.Fatalf("%d writes, %d reads: the storm did not run", writes.Load(), reads.Load())
	}
	first := audit(t, call)
	deadline := time.Now().Add(60 * time.Second)
	var last auditResult
	for {
		last = audit(t, call)
		if last.Stale == 0 && outboxEmpty(t, database) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("60s after the storm the audit finds %d stale of %d sampled: %v", last.Stale, last.Sampled, last.StaleKeys)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if last.Sampled == 0 {
		t.Fatal("the audit sampled nothing")
	}
	t.Logf("%d writes and %d reads, %d instances killed with SIGKILL under CLIENT PAUSE WRITE: the last instance's first audit found %d stale of %d sampled, then 0 of %d once caught up",
		writes.Load(), reads.Load(), kills, first.Stale, first.Sampled, last.Sampled)
}

func audit(t *testing.T, call func(method, path, body string) (int, []byte, error)) auditResult {
	t.Helper()
	var res auditResult
	code, b, err := call("GET", "/admin/audit?cache=task&n=200", "")
	if err == nil && code == 200 {
		err = json.Unmarshal(b, &res)
	}
	if err != nil || code != 200 {
		t.Fatalf("audit: %d %s, %v", code, b, err)
	}
	return res
}

// outboxEmpty reports whether database's outbox holds no rows.
func outboxEmpty(t *testing.T, database string) bool {
	t.Helper()
	driver, dsn := "pgx", database
	if p, ok := strings.CutPrefix(database, "sqlite:"); ok {
		driver, dsn = "sqlite", "file:"+p+"?_pragma=busy_timeout(10000)"
	}
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM cacheaside_outbox`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 0
}
