package cacheoutbox

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
)

// The environment of a listener run as a child process of the test
// binary (TestListenerChild), to be killed with SIGKILL.
const (
	envChildConn  = "CACHEOUTBOX_CHILD_CONN"
	envChildRedis = "CACHEOUTBOX_CHILD_REDIS"
	envChildCache = "CACHEOUTBOX_CHILD_CACHE"
	envChildLog   = "CACHEOUTBOX_CHILD_LOG"
)

// loggedCache appends every key it invalidated, once Redis confirmed it,
// to a file: a process killed with SIGKILL loses nothing the kernel took.
type loggedCache struct {
	Invalidator
	f *os.File
}

func (c *loggedCache) Invalidate(ctx context.Context, keys ...string) (int64, error) {
	n, err := c.Invalidator.Invalidate(ctx, keys...)
	if err == nil {
		if _, werr := c.f.WriteString(strings.Join(keys, "\n") + "\n"); werr != nil {
			return n, werr
		}
	}
	return n, err
}

func itemsTable(name string) Table {
	return Table{Name: "public.items", Targets: func(c Change) []Target {
		r := c.New
		if r == nil {
			r = c.Old
		}
		return []Target{{Cache: name, Key: name + ":" + r["id"]}}
	}}
}

// TestListenerChild is the listener of TestListenerKilled, run in a
// process of its own; it is skipped when not started by that test.
func TestListenerChild(t *testing.T) {
	conn := os.Getenv(envChildConn)
	if conn == "" {
		t.Skip("run by TestListenerKilled")
	}
	f, err := os.OpenFile(os.Getenv(envChildLog), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	name := os.Getenv(envChildCache)
	c := &loggedCache{Invalidator: newCache(t, os.Getenv(envChildRedis), name, cacheaside.Degradation{}), f: f}
	l, err := NewListener(ListenerOptions{Conn: conn, Tables: []Table{itemsTable(name)},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}, c)
	if err != nil {
		t.Fatal(err)
	}
	_ = l.Run(context.Background()) // until killed
}

// TestListenerKilled: 10,000 single-row UPDATEs from a plain SQL
// connection while the listener, a process of its own, is killed with
// SIGKILL at random moments and started again at once. Every changed row's
// key must be gone from Redis at the end (checked against the database's
// rows), and the keys invalidated more than once are counted.
func TestListenerKilled(t *testing.T) {
	const rows = 10_000
	conn, db := itemsDB(t, rows)
	addr, _ := redisAddr(t)
	name := "item" + unique()
	left := fillItems(t, newCache(t, addr, name, cacheaside.Degradation{}), addr, name, rows)
	logPath := filepath.Join(t.TempDir(), "invalidated")
	var stderr bytes.Buffer
	var mu sync.Mutex
	child := func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestListenerChild$")
		cmd.Env = append(os.Environ(), envChildConn+"="+conn, envChildRedis+"="+addr, envChildCache+"="+name, envChildLog+"="+logPath)
		mu.Lock()
		cmd.Stderr = &lockedWriter{&mu, &stderr}
		mu.Unlock()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	cur := child()
	stop := make(chan struct{})
	kills := 0
	var killer sync.WaitGroup
	logged := func() int64 {
		fi, err := os.Stat(logPath)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	killer.Go(func() {
		for {
			// Each listener is killed a random moment (0-100ms) after it
			// has applied something, so every life is cut mid-stream.
			from := logged()
			for logged() == from {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(rand.IntN(100)) * time.Millisecond):
			}
			_ = cur.Process.Signal(syscall.SIGKILL)
			_ = cur.Wait()
			kills++
			cur = child()
		}
	})
	for i := 1; i <= rows; i++ {
		if _, err := db.Exec(`UPDATE items SET n = n + 1 WHERE id = $1`, i); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	killer.Wait()
	defer func() { _ = cur.Process.Signal(syscall.SIGKILL); _ = cur.Wait() }()
	var changed int
	if err := db.QueryRow(`SELECT count(*) FROM items WHERE n = 1`).Scan(&changed); err != nil || changed != rows {
		t.Fatalf("%d rows changed in the database, %v", changed, err)
	}
	remaining := -1
	deadline := time.Now().Add(60 * time.Second)
	for remaining != 0 && time.Now().Before(deadline) {
		if remaining = left(); remaining != 0 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	b, _ := os.ReadFile(logPath)
	times := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		times[sc.Text()]++
	}
	dups := 0
	for _, n := range times {
		dups += n - 1
	}
	if remaining != 0 {
		mu.Lock()
		t.Fatalf("%d of %d changed rows' keys still in Redis after %d kills; %d keys logged invalidated\n%s", remaining, rows, kills, len(times), stderr.String())
	}
	t.Logf("%d UPDATEs, the listener killed with SIGKILL %d times: 0 of %d changed rows missed; %d invalidations of keys already invalidated (at least once)", rows, kills, rows, dups)
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(p)
}
