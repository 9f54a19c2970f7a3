package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

func main() {
	redis.SetLogger(quietRedis{}) // go-redis's own dial-retry lines; errors are reported once, by the command
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes.
const (
	exitOK    = 0
	exitError = 1 // the command failed: Redis unreachable, no such key, foreign data, ...
	exitUsage = 2 // the command line is wrong
)

// defaultRedisURL is used when neither --redis nor $REDIS_URL is set.
const defaultRedisURL = "redis://127.0.0.1:6379/0"

const usageText = `Usage: cacheaside [flags] COMMAND [flags] ARGS

Commands:
  inspect KEY                     decode the cacheaside entry under KEY
  scan PREFIX                     list the keys starting with PREFIX, with kind, size and TTL
  invalidate key KEY...           delete keys, as Cache.Invalidate does
  invalidate prefix PREFIX        delete every key under PREFIX, as Cache.InvalidatePrefix does
  invalidate namespace NS         bump the namespace's generation, as Cache.InvalidateNamespace does
  invalidate tag TAG...           new generations for the tags, as Cache.InvalidateTags does
  invalidate clear                a new Clear generation for the cache, as Cache.Clear does

Flags (before or after COMMAND):
  --redis URL       redis:// or rediss:// URL (default $REDIS_URL, else ` + defaultRedisURL + `)
  --cluster         connect to a Redis Cluster; URL seeds more nodes with ?addr=host:port
  --timeout D       bound on the whole command, connecting included (default 10s)
  --json            machine-readable output

Flags of invalidate (after "invalidate"):
  --cache NAME      Options.Name of the caches whose local tiers must hear it (default "default")
  --channel CH      their LocalOptions.Channel, if set (default cacheaside:invalidate:NAME)
  --ttl D           their Policy.TTL plus stale window; sets the new generation key's lifetime (default 5m)

Run "go doc github.com/seed-b4ec662f/cacheaside/cmd/cacheaside" for the full guide.
`

// config holds the flags every command accepts.
type config struct {
	redisURL string
	cluster  bool
	timeout  time.Duration
	json     bool
}

// register adds the common flags to fs, with the values already in c as
// defaults, so they may be given before or after the command name.
func (c *config) register(fs *flag.FlagSet) {
	fs.StringVar(&c.redisURL, "redis", c.redisURL, "Redis `URL`")
	fs.BoolVar(&c.cluster, "cluster", c.cluster, "connect to a Redis Cluster")
	fs.DurationVar(&c.timeout, "timeout", c.timeout, "bound on the whole command")
	fs.BoolVar(&c.json, "json", c.json, "machine-readable output")
}

// usageError is a wrong command line: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// run is the whole command: it parses args (without the program name),
// writes results to stdout and diagnostics to stderr, and returns the exit
// code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg := &config{redisURL: defaultRedisURL, timeout: 10 * time.Second}
	if u := os.Getenv("REDIS_URL"); u != "" {
		cfg.redisURL = u
	}
	global := newFlagSet("cacheaside", stderr)
	cfg.register(global)
	if err := global.Parse(args); err != nil {
		return parseExit(err)
	}
	rest := global.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	var cmd func(ctx context.Context, cfg *config, args []string, stdout, stderr io.Writer) error
	switch rest[0] {
	case "inspect":
		cmd = cmdInspect
	case "scan":
		cmd = cmdScan
	case "invalidate":
		cmd = cmdInvalidate
	case "help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	default:
		fmt.Fprintf(stderr, "cacheaside: unknown command %q\n\n%s", rest[0], usageText)
		return exitUsage
	}
	err := cmd(ctx, cfg, rest[1:], stdout, stderr)
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errParsed):
		return exitUsage
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "cacheaside %s: %s\n(run \"cacheaside help\" for usage)\n", termSafe(rest[0]), termSafe(err.Error()))
		return exitUsage
	}
	fmt.Fprintf(stderr, "cacheaside %s: %s\n", termSafe(rest[0]), termSafe(err.Error()))
	return exitError
}

// errParsed stands for a flag error that the flag package has already
// printed.
var errParsed = errors.New("bad flags")

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usageText) }
	return fs
}

func parseExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	return exitUsage
}

// parseFlags parses a command's flags: the common ones and any extra ones
// add registers.
func parseFlags(name string, cfg *config, args []string, stderr io.Writer, add func(fs *flag.FlagSet)) ([]string, error) {
	fs := newFlagSet("cacheaside "+name, stderr)
	cfg.register(fs)
	if add != nil {
		add(fs)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, errParsed
	}
	if cfg.timeout <= 0 {
		return nil, usagef("--timeout must be positive, not %v", cfg.timeout)
	}
	return fs.Args(), nil
}

// connect builds the client cfg describes and checks with a PING, under
// the command's deadline, that Redis answers.
func connect(ctx context.Context, cfg *config) (redis.UniversalClient, error) {
	where := redactURL(cfg.redisURL)
	dial := min(cfg.timeout, 3*time.Second)
	var rdb redis.UniversalClient // *redis.Client, or *redis.ClusterClient with --cluster
	if cfg.cluster {
		o, err := redis.ParseClusterURL(cfg.redisURL)
		if err != nil {
			return nil, usagef("--redis %s: %s", where, strings.ReplaceAll(err.Error(), cfg.redisURL, where))
		}
		if o.DialTimeout == 0 {
			o.DialTimeout = dial
		}
		rdb = redis.NewClusterClient(cacheaside.Recommended(o))
	} else {
		if strings.HasPrefix(cfg.redisURL, "redis+cluster://") {
			return nil, usagef("--redis %s: for a cluster, give --cluster and a redis:// URL (more seeds with ?addr=host:port)", where)
		}
		o, err := redis.ParseURL(cfg.redisURL)
		if err != nil {
			return nil, usagef("--redis %s: %s", where, strings.ReplaceAll(err.Error(), cfg.redisURL, where))
		}
		if o.DialTimeout == 0 {
			o.DialTimeout = dial
		}
		rdb = redis.NewClient(cacheaside.Recommended(o))
	}
	start := time.Now()
	if err := rdb.Ping(ctx).Err(); err != nil {
		_ = rdb.Close()
		if isTimeout(ctx, err) {
			return nil, fmt.Errorf("cannot reach Redis at %s: no answer after %v (--timeout %v)", where, time.Since(start).Round(time.Millisecond), cfg.timeout)
		}
		var rerr redis.Error
		if errors.As(err, &rerr) { // Redis answered, with an error
			return nil, fmt.Errorf("connection check of Redis at %s failed: %v%s", where, err, hint(err))
		}
		return nil, fmt.Errorf("cannot reach Redis at %s: %v", where, err)
	}
	return rdb, nil
}

// redactURL hides a password in u for messages.
func redactURL(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	return p.Redacted()
}

// session is what every command starts with: its deadline (--timeout)
// and a client that answered a PING. done releases both.
func session(ctx context.Context, cfg *config) (context.Context, redis.UniversalClient, func(), error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	rdb, err := connect(ctx, cfg)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return ctx, rdb, func() { _ = rdb.Close(); cancel() }, nil
}

type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

// quietLogger discards the library's log lines: the CLI reports errors
// itself.
var quietLogger = slog.New(slog.DiscardHandler)

// isTimeout reports whether err is a deadline: the command's, or a
// socket's.
func isTimeout(ctx context.Context, err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// describeRedisErr turns a deadline into a short message.
func describeRedisErr(ctx context.Context, cfg *config, err error) error {
	if isTimeout(ctx, err) {
		return fmt.Errorf("no answer from Redis within --timeout %v: %w", cfg.timeout, err)
	}
	if h := hint(err); h != "" {
		return fmt.Errorf("%w%s", err, h)
	}
	return err
}

// hint suggests the fix for a server of the other kind than --cluster
// says.
func hint(err error) string {
	switch msg := err.Error(); {
	case strings.Contains(msg, "cluster support disabled"):
		return " (this server is not a cluster node: drop --cluster)"
	case strings.HasPrefix(msg, "MOVED ") || strings.HasPrefix(msg, "CROSSSLOT") || strings.Contains(msg, "CLUSTERDOWN"):
		return " (this server is a Redis Cluster node: add --cluster)"
	}
	return ""
}
