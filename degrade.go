package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Degradation. The cache must never make the application slower or less
// available than no cache at all. Three things see to it:
//
//   - a budget: every Redis command runs under Options.OpTimeout (or the
//     caller's deadline, if sooner), so a slow or black-holed Redis costs a
//     Get at most that before it falls back to the loader;
//   - a circuit breaker (github.com/sony/gobreaker/v2): after
//     BreakerFailures consecutive transport failures or timeouts, Redis is
//     skipped entirely for BreakerCooldown, then probed again, so a dead
//     Redis adds almost nothing to a Get;
//   - a policy for Redis being unavailable: fail open (call the loader,
//     at most MaxLoadsWhileDown at a time, so the database is shielded) or
//     fail closed (return ErrRedisUnavailable).

// RedisDownPolicy says what Get does when Redis cannot be used.
type RedisDownPolicy int

const (
	// FailOpen calls the loader and returns its value, uncached. Default.
	FailOpen RedisDownPolicy = iota
	// FailClosed returns an error matching ErrRedisUnavailable, within the
	// operation budget, without calling the loader.
	FailClosed
)

func (p RedisDownPolicy) String() string {
	switch p {
	case FailOpen:
		return "fail-open"
	case FailClosed:
		return "fail-closed"
	}
	return fmt.Sprintf("RedisDownPolicy(%d)", int(p))
}

// guarded wraps the Redis client: each command runs under the operation
// budget and through the circuit breaker.
type guarded struct {
	rdb     Redis
	budget  time.Duration
	cb      *gobreaker.TwoStepCircuitBreaker[struct{}] // nil: no breaker
	skipped atomic.Uint64                              // commands not sent because the breaker was open
}

// errBreakerOpen is the error of every command the open breaker skips.
var errBreakerOpen = fmt.Errorf("%w: circuit breaker open", ErrRedisUnavailable)

// errExcluded marks a result that must not move the breaker: the caller's
// own cancellation.
var errExcluded = errors.New("excluded")

// transient server replies that mean "Redis cannot serve now".
var unavailablePrefixes = []string{"LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "READONLY"}

// breakerErr classifies the outcome of one command for the breaker: nil
// for success (a reply, including a miss or an ordinary error reply),
// errExcluded for the caller's own cancellation, err for a transport
// failure, a timeout or an "unavailable" reply.
func breakerErr(caller context.Context, err error) error {
	if err == nil || errors.Is(err, redis.Nil) {
		return nil
	}
	if errors.Is(caller.Err(), context.Canceled) {
		return errExcluded // the caller gave up; Redis may be fine
	}
	var re redis.Error
	if errors.As(err, &re) {
		msg := re.Error()
		for _, p := range unavailablePrefixes {
			if strings.HasPrefix(msg, p) {
				return err
			}
		}
		return nil
	}
	return err
}

// begin admits one command: it returns the context to run it on and the
// function to call with its error, or ErrRedisUnavailable if the breaker is
// open.
func (g *guarded) begin(ctx context.Context, budget time.Duration) (context.Context, func(error), error) {
	var report func(error)
	if g.cb != nil {
		done, err := g.cb.Allow()
		if err != nil {
			g.skipped.Add(1)
			return nil, nil, errBreakerOpen
		}
		report = done
	}
	// Leave the caller at least half of its remaining time for the loader:
	// a short request deadline must not be spent waiting on Redis alone.
	if dl, ok := ctx.Deadline(); ok {
		budget = max(min(budget, time.Until(dl)/2), time.Millisecond)
	}
	octx, cancel := context.WithTimeout(ctx, budget)
	return octx, func(err error) {
		cancel()
		if report != nil {
			report(breakerErr(ctx, err))
		}
	}, nil
}

func (g *guarded) Get(ctx context.Context, key string) *redis.StringCmd {
	octx, end, err := g.begin(ctx, g.budget)
	if err != nil {
		cmd := redis.NewStringCmd(ctx, "get", key)
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Get(octx, key)
	end(cmd.Err())
	return cmd
}

func (g *guarded) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	octx, end, err := g.begin(ctx, g.budget)
	if err != nil {
		cmd := redis.NewSliceCmd(ctx, "mget")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.MGet(octx, keys...)
	end(cmd.Err())
	return cmd
}

func (g *guarded) Set(ctx context.Context, key string, value any, expiration time.Duration) *redis.StatusCmd {
	octx, end, err := g.begin(ctx, g.budget)
	if err != nil {
		cmd := redis.NewStatusCmd(ctx, "set", key)
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Set(octx, key, value, expiration)
	end(cmd.Err())
	return cmd
}

func (g *guarded) Unlink(ctx context.Context, keys ...string) *redis.IntCmd {
	octx, end, err := g.begin(ctx, g.budget)
	if err != nil {
		cmd := redis.NewIntCmd(ctx, "unlink")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Unlink(octx, keys...)
	end(cmd.Err())
	return cmd
}

// bulkBudget bounds the commands of invalidations, which may carry
// thousands of keys and are not on a reader's path.
func (g *guarded) bulkBudget() time.Duration { return max(10*g.budget, time.Second) }

func (g *guarded) Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd {
	octx, end, err := g.begin(ctx, g.bulkBudget())
	if err != nil {
		cmd := redis.NewScanCmd(ctx, nil, "scan")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Scan(octx, cursor, match, count)
	end(cmd.Err())
	return cmd
}

func (g *guarded) Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error) {
	octx, end, err := g.begin(ctx, g.bulkBudget())
	if err != nil {
		return nil, err
	}
	cmds, err := g.rdb.Pipelined(octx, fn)
	end(err)
	return cmds, err
}

func (g *guarded) script(ctx context.Context, run func(context.Context) *redis.Cmd) *redis.Cmd {
	octx, end, err := g.begin(ctx, g.budget)
	if err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	cmd := run(octx)
	end(cmd.Err())
	return cmd
}

func (g *guarded) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, func(c context.Context) *redis.Cmd { return g.rdb.Eval(c, script, keys, args...) })
}

func (g *guarded) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, func(c context.Context) *redis.Cmd { return g.rdb.EvalSha(c, sha1, keys, args...) })
}

func (g *guarded) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, func(c context.Context) *redis.Cmd { return g.rdb.EvalRO(c, script, keys, args...) })
}

func (g *guarded) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, func(c context.Context) *redis.Cmd { return g.rdb.EvalShaRO(c, sha1, keys, args...) })
}

func (g *guarded) ScriptExists(ctx context.Context, hashes ...string) *redis.BoolSliceCmd {
	return g.rdb.ScriptExists(ctx, hashes...)
}

func (g *guarded) ScriptLoad(ctx context.Context, script string) *redis.StringCmd {
	return g.rdb.ScriptLoad(ctx, script)
}

var _ Redis = (*guarded)(nil)

// newBreaker builds the circuit breaker of a cache, reporting its state
// changes to the logger and the Recorder.
func newBreaker(name string, failures int, cooldown time.Duration, log *slog.Logger, rec Recorder, opens *atomic.Uint64) *gobreaker.TwoStepCircuitBreaker[struct{}] {
	return gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        name,
		MaxRequests: 1, // half-open: one probe at a time
		Timeout:     cooldown,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= uint32(failures) },
		IsExcluded:  func(err error) bool { return errors.Is(err, errExcluded) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			level := slog.LevelInfo
			if to == gobreaker.StateOpen {
				level = slog.LevelWarn
				opens.Add(1)
			}
			log.Log(context.Background(), level, "cacheaside: Redis circuit breaker "+to.String(),
				slog.String("cache", name), slog.String("from", from.String()))
			rec.BreakerState(name, to.String())
		},
	})
}

// loadSlot takes one of the MaxLoadsWhileDown slots for a load that
// bypasses Redis, waiting on ctx or failing fast with ErrOverloaded as the
// options say. The returned function gives the slot back.
func (c *Cache[T]) loadSlot(ctx context.Context) (func(), error) {
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	default:
	}
	if c.opts.FailFastWhenCapped {
		c.stats.overloaded.Add(1)
		return nil, ErrOverloaded
	}
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	case <-ctx.Done():
		c.stats.overloaded.Add(1)
		return nil, fmt.Errorf("%w: %w", ErrOverloaded, ctx.Err())
	}
}
