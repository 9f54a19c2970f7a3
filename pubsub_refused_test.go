package cacheaside

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// logText is a logger that keeps every line, attributes included.
type logText struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logText) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logText) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logText) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// linesWith returns the lines containing every one of subs.
func (l *logText) linesWith(subs ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		ok := line != ""
		for _, s := range subs {
			ok = ok && strings.Contains(line, s)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// TestPubSubRefused runs the local tier on a redis-server whose pub/sub
// commands are disabled (rename-command to ""), as some managed servers
// and proxies have them: New works, the refusal is a configuration error
// logged once, WaitLocal reports it at once, writes whose delete landed
// do not fail, and a contended fill still lands (fill.lua publishes with
// pcall).
func TestPubSubRefused(t *testing.T) {
	srv := startRedis(t, "--rename-command", "SUBSCRIBE", "", "--rename-command", "PUBLISH", "")
	ctx := context.Background()
	var logs logText
	client := func() *redis.Client {
		rdb := redis.NewClient(Recommended(&redis.Options{Addr: srv.addr()}))
		t.Cleanup(func() { _ = rdb.Close() })
		return rdb
	}
	c, err := New[string](client(), &Options[string]{Name: "refused", Logger: logs.logger(), Local: &LocalOptions{}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })

	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = c.WaitLocal(wctx)
	if !errors.Is(err, ErrNoPubSub) || wctx.Err() != nil {
		t.Fatalf("WaitLocal = %v (ctx %v), want ErrNoPubSub before the deadline", err, wctx.Err())
	}
	if !strings.Contains(err.Error(), "unknown command") {
		t.Errorf("WaitLocal's error does not carry the server's reply: %v", err)
	}
	if c.local.live.Load() {
		t.Fatal("LocalLive on a server that refuses SUBSCRIBE")
	}
	if got := logs.linesWith("level=ERROR", "refuses SUBSCRIBE", "Options.Local"); len(got) != 1 {
		t.Fatalf("want one error line naming Options.Local, got %d:\n%s", len(got), logs.String())
	}

	key := "refused:k"
	if err := c.Set(ctx, key, "v1"); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if _, err := c.Invalidate(ctx, key); err != nil {
		t.Fatalf("Invalidate on a server without pub/sub: %v, want nil (nobody can subscribe there)", err)
	}
	if n, _ := client().Exists(ctx, key).Result(); n != 0 {
		t.Fatal("the key is still there after Invalidate")
	}
	if st := c.Stats(); st.PendingInvals != 0 || st.QueuedInvals != 0 {
		t.Fatalf("pending %d, queued %d: nothing failed, nothing may be queued", st.PendingInvals, st.QueuedInvals)
	}
	got, err := c.Get(ctx, key, func(context.Context) (string, error) { return "v2", nil })
	if err != nil || got != "v2" {
		t.Fatalf("Get = %q, %v", got, err)
	}

	// A contended lease: the holder's fill publishes a wake-up, which the
	// server refuses; the fill must still land, and the waiter (another
	// process) gets the value by polling.
	other, err := New[string](client(), &Options[string]{Name: "refused", Logger: logs.logger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	hot := "refused:hot"
	var loads counter
	release := make(chan struct{})
	held := make(chan struct{})
	type res struct {
		v   string
		err error
	}
	first := make(chan res, 1)
	go func() {
		v, err := c.Get(ctx, hot, func(context.Context) (string, error) {
			loads.calls.Add(1)
			close(held)
			<-release
			return "hot", nil
		})
		first <- res{v, err}
	}()
	<-held
	second := make(chan res, 1)
	go func() {
		v, err := other.Get(ctx, hot, func(context.Context) (string, error) {
			loads.calls.Add(1)
			return "second load", nil
		})
		second <- res{v, err}
	}()
	waitFor(t, "the second Get to wait on the lease", func() bool { return other.Stats().LeaseContended > 0 })
	close(release)
	for _, ch := range []chan res{first, second} {
		if r := <-ch; r.err != nil || r.v != "hot" {
			t.Fatalf("Get = %q, %v; want the holder's value", r.v, r.err)
		}
	}
	if n := loads.calls.Load(); n != 1 {
		t.Fatalf("%d loads, want 1", n)
	}
	if st := c.Stats(); st.FillsRejected != 0 || st.RedisErrors != 0 {
		t.Fatalf("the holder's fill failed: %+v", st)
	}
	if got := logs.linesWith("level=ERROR"); len(got) != 1 {
		t.Fatalf("want still one error line, got %d:\n%s", len(got), logs.String())
	}
}

// TestPublishRefused: SUBSCRIBE works but PUBLISH is disabled, so other
// processes' local tiers are live and never told. Invalidate's delete
// lands; its error says that only the message failed (ErrNotPublished,
// ErrNoPubSub), nothing is queued, and the log quotes the message the
// server echoes instead of printing its raw bytes.
func TestPublishRefused(t *testing.T) {
	srv := startRedis(t, "--rename-command", "PUBLISH", "")
	ctx := context.Background()
	var logs logText
	rdb := redis.NewClient(Recommended(&redis.Options{Addr: srv.addr()}))
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := New[string](rdb, &Options[string]{Name: "pubrefused", Logger: logs.logger(), Local: &LocalOptions{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.WaitLocal(wctx); err != nil {
		t.Fatalf("WaitLocal: %v", err)
	}
	keys := []string{"pr:a\v1", "pr:b"}
	for _, k := range keys {
		if err := rdb.Set(ctx, k, "x", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		_, err := c.Invalidate(ctx, keys...)
		if !errors.Is(err, ErrNotPublished) || !errors.Is(err, ErrNoPubSub) {
			t.Fatalf("Invalidate #%d = %v, want ErrNotPublished and ErrNoPubSub", i, err)
		}
		var oe *OpError
		if !errors.As(err, &oe) || oe.Op != "publish" {
			t.Fatalf("Invalidate's error carries no publish *OpError: %v", err)
		}
	}
	if n, _ := rdb.Exists(ctx, keys...).Result(); n != 0 {
		t.Fatalf("%d keys left after Invalidate", n)
	}
	if st := c.Stats(); st.PendingInvals != 0 || st.QueuedInvals != 0 {
		t.Fatalf("pending %d, queued %d: the deletes landed, nothing may be queued", st.PendingInvals, st.QueuedInvals)
	}
	if got := logs.linesWith("level=ERROR", "refuses PUBLISH", "Options.Local"); len(got) != 1 {
		t.Fatalf("want one error line naming Options.Local, got %d:\n%s", len(got), logs.String())
	}
	if strings.ContainsAny(logs.String(), "\v\x00\x01\x02\x03\x04") {
		t.Fatalf("the log holds raw message bytes:\n%q", logs.String())
	}
	if !strings.Contains(logs.String(), `\\v`) && !strings.Contains(logs.String(), `\\x`) {
		t.Fatalf("the log does not quote the message the server echoed:\n%s", logs.String())
	}

	// A delete that failed is not "not published": it is the Redis error,
	// and it is queued.
	downClient := redis.NewClient(Recommended(&redis.Options{Addr: closedAddr(t)}))
	t.Cleanup(func() { _ = downClient.Close() })
	down, err := New[string](downClient, &Options[string]{
		Name: "pubrefused-down", Logger: slog.New(slog.DiscardHandler), Local: &LocalOptions{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = down.Close() })
	_, err = down.Invalidate(ctx, "pr:c")
	var oe *OpError
	if err == nil || errors.Is(err, ErrNotPublished) || !errors.As(err, &oe) || oe.Op != "invalidate" {
		t.Fatalf("Invalidate with Redis down = %v, want the invalidate *OpError only", err)
	}
	if st := down.Stats(); st.QueuedInvals != 1 {
		t.Fatalf("queued %d, want 1", st.QueuedInvals)
	}
}
