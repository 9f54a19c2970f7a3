package cacheaside

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// lines is a slog.Handler that keeps every record's level and message.
type lines struct {
	mu  sync.Mutex
	all []string
}

func (l *lines) Enabled(context.Context, slog.Level) bool { return true }
func (l *lines) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *lines) WithGroup(string) slog.Handler            { return l }
func (l *lines) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelInfo {
		return nil // debug lines are off in production
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.all = append(l.all, r.Level.String()+" "+r.Message)
	return nil
}

func (l *lines) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.all {
		if strings.Contains(s, sub) {
			n++
		}
	}
	return n
}

// TestOutageLogsBounded: Redis is killed for about 3s while 4 workers call
// Get without pause on a cache with a local tier. The log shows the outage
// as state changes (Redis down, bus lost, Redis recovered, bus back) and a
// bounded number of error lines, not a line per failed command.
func TestOutageLogsBounded(t *testing.T) {
	srv := startRedis(t)
	rec := &lines{}
	rdb := redis.NewClient(&redis.Options{Addr: srv.addr(), ContextTimeoutEnabled: true, MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := New[string](rdb, &Options[string]{Logger: slog.New(rec),
		Local:       &LocalOptions{TTL: 50 * time.Millisecond, HealthCheck: 100 * time.Millisecond},
		Degradation: Degradation{BreakerCooldown: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	waitFor(t, "the bus", c.local.live.Load)
	ctx := context.Background()
	load := func(context.Context) (string, error) { return "v", nil }
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var gets, failed int64
	var mu sync.Mutex
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_, err := c.Get(ctx, fmt.Sprintf("k%d", (w*1000+i)%50), load)
				mu.Lock()
				gets++
				if err != nil {
					failed++
				}
				mu.Unlock()
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	srv.kill()
	time.Sleep(3 * time.Second)
	srv.start()
	waitFor(t, "Redis recovered", func() bool { return rec.count("Redis recovered") == 1 })
	waitFor(t, "the bus back", func() bool { return rec.count("bus back") == 1 })
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	s := c.Stats()
	rec.mu.Lock()
	all := append([]string(nil), rec.all...)
	rec.mu.Unlock()
	t.Logf("%d Gets (%d failed), %d Redis errors and %d skipped commands; %d log lines:\n  %s",
		gets, failed, s.RedisErrors, s.RedisSkipped, len(all), strings.Join(all, "\n  "))
	if failed != 0 {
		t.Errorf("%d Gets failed", failed)
	}
	for _, m := range []string{"Redis down", "Redis recovered", "bus lost", "bus back"} {
		if n := rec.count(m); n != 1 {
			t.Errorf("%q logged %d times, want once", m, n)
		}
	}
	if len(all) > 12 {
		t.Errorf("%d log lines for one outage, want a handful", len(all))
	}
}
