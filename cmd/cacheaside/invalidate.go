package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// invalidateFlags are the flags of invalidate: who must hear of it.
type invalidateFlags struct {
	cache   string        // Options.Name of the caches
	channel string        // their LocalOptions.Channel, if not the default
	ttl     time.Duration // their Policy.TTL (plus stale window): the generation key's lifetime
}

func (f *invalidateFlags) channelName() string {
	if f.channel != "" {
		return f.channel
	}
	return wire.BusChannelPrefix + f.cache
}

// invalidateResult is what invalidate reports; --json prints it.
type invalidateResult struct {
	Op            string   `json:"op"` // key, prefix, namespace, tag, clear
	Keys          []string `json:"keys,omitempty"`
	Tags          []string `json:"tags,omitempty"`
	Prefix        string   `json:"prefix,omitempty"`
	Deleted       *int64   `json:"deleted,omitempty"` // keys that existed and were deleted
	Namespace     string   `json:"namespace,omitempty"`
	GenerationKey string   `json:"generation_key,omitempty"`
	OldGeneration *string  `json:"old_generation,omitempty"` // absent: there was none
	NewGeneration string   `json:"new_generation,omitempty"`
	Channel       string   `json:"channel"` // where the bus message went
	// Subscribers is how many processes (other than this command) were
	// subscribed to Channel when the message went out: the local tiers
	// that heard it. Absent when nothing was published.
	Subscribers *int64 `json:"subscribers,omitempty"`
	Refused     string `json:"pubsub_refused,omitempty"` // the server refuses SUBSCRIBE: nothing to tell
}

func cmdInvalidate(ctx context.Context, cfg *config, args []string, stdout, stderr io.Writer) error {
	f := &invalidateFlags{cache: wire.DefaultName, ttl: wire.DefaultTTL}
	rest, err := parseFlags("invalidate", cfg, args, stderr, func(fs *flag.FlagSet) {
		fs.StringVar(&f.cache, "cache", f.cache, "Options.Name of the caches to tell")
		fs.StringVar(&f.channel, "channel", f.channel, "their LocalOptions.Channel, if set")
		fs.DurationVar(&f.ttl, "ttl", f.ttl, "their Policy.TTL plus stale window")
	})
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return usagef("invalidate needs key KEY..., prefix PREFIX, namespace NS, tag TAG... or clear")
	}
	if f.cache == "" {
		return usagef("--cache must not be empty")
	}
	if f.ttl <= 0 {
		return usagef("--ttl must be positive, not %v", f.ttl)
	}
	op, targets := rest[0], rest[1:]
	res := &invalidateResult{Op: op, Channel: f.channelName()}
	var ns cacheaside.Namespace
	switch op {
	case "key", "keys":
		res.Op = "key"
		if len(targets) == 0 {
			return usagef("invalidate key needs at least one KEY")
		}
		for _, k := range targets {
			if k == "" {
				return usagef("invalidate key: empty KEY")
			}
		}
		res.Keys = targets
	case "prefix":
		if len(targets) != 1 || targets[0] == "" {
			return usagef("invalidate prefix takes one non-empty PREFIX")
		}
		res.Prefix = targets[0]
	case "namespace", "ns":
		res.Op = "namespace"
		if len(targets) != 1 {
			return usagef("invalidate namespace takes one NS")
		}
		if ns, err = parseNamespace(targets[0]); err != nil {
			return &usageError{msg: err.Error()}
		}
		res.Namespace, res.GenerationKey = ns.String(), ns.String()+wire.GenerationSuffix
	case "tag", "tags":
		res.Op = "tag"
		if len(targets) == 0 {
			return usagef("invalidate tag needs at least one TAG")
		}
		for _, tag := range targets {
			if tag == "" {
				return usagef("invalidate tag: empty TAG")
			}
		}
		res.Tags = targets
	case "clear":
		if len(targets) != 0 {
			return usagef("invalidate clear takes no argument: it clears the cache --cache names")
		}
	default:
		return usagef("invalidate %q: want key, prefix, namespace, tag or clear", op)
	}

	ctx, rdb, done, err := session(ctx, cfg)
	if err != nil {
		return err
	}
	defer done()
	c, err := cacheaside.New[json.RawMessage](rdb, &cacheaside.Options[json.RawMessage]{
		Name:       f.cache,
		Namespaced: res.Op == "namespace",
		// InvalidateTags needs Tags set; which tags keys carry matters
		// only to readers.
		Tags:      noTags(res.Op == "tag"),
		Clearable: res.Op == "clear",
		Policy:    cacheaside.Policy{TTL: f.ttl},
		// Local makes the library publish on the bus, as every writer
		// sharing keys with a local tier must; this process's own tier is
		// never read.
		Local:            &cacheaside.LocalOptions{Channel: f.channel},
		NoReadCoalescing: true,
		Logger:           quietLogger,
		Degradation: cacheaside.Degradation{
			OpTimeout:            cfg.timeout,
			WriteTimeout:         cfg.timeout,
			NoBreaker:            true,
			NoRetryInvalidations: true, // the process exits: say it failed, do not queue it
		},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	// This command's own subscription first, so the count of subscribers
	// below can leave it out.
	if err := c.WaitLocal(ctx); errors.Is(err, cacheaside.ErrNoPubSub) {
		res.Refused = err.Error()
	} else if err != nil {
		return describeRedisErr(ctx, cfg, fmt.Errorf("subscribing to %s: %w", res.Channel, err))
	}

	switch res.Op {
	case "key":
		_, err = c.Invalidate(ctx, res.Keys...)
		n := int64(c.Stats().Invalidations)
		res.Deleted = &n
	case "prefix":
		var n int64
		n, err = c.InvalidatePrefix(ctx, res.Prefix)
		res.Deleted = &n
	case "namespace":
		err = bumpNamespace(ctx, rdb, c, ns, res)
	case "tag":
		err = c.InvalidateTags(ctx, res.Tags...)
	case "clear":
		err = c.Clear(ctx)
	}
	if err != nil {
		if res.Deleted != nil && *res.Deleted > 0 {
			err = fmt.Errorf("%w (%d keys were deleted before it)", err, *res.Deleted)
		}
		return describeRedisErr(ctx, cfg, err)
	}
	if res.Refused == "" {
		classic, sharded, err := subscribers(ctx, rdb, res.Channel)
		if err != nil {
			return describeRedisErr(ctx, cfg, fmt.Errorf("the invalidation is done; counting the subscribers of %s failed: %w", res.Channel, err))
		}
		if classic > 0 && sharded > 0 {
			fmt.Fprintf(termWriter{stderr}, "warning: %d processes subscribe to %s by classic pub/sub and %d by sharded pub/sub (this command's own included), and the two kinds do not hear each other's messages; every process on one Cluster should run a version of cacheaside that uses sharded pub/sub where the Cluster has it\n", classic, res.Channel, sharded)
		}
		n := max(classic+sharded-1, 0) // this command's own
		res.Subscribers = &n
	}
	if res.Subscribers != nil && *res.Subscribers == 0 {
		fmt.Fprintf(termWriter{stderr}, "warning: no process subscribes to %s, so no local tier heard this; give the caches' Options.Name with --cache (now %q) or their LocalOptions.Channel with --channel\n", res.Channel, f.cache)
	}
	if cfg.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	printInvalidate(stdout, res)
	return nil
}

// bumpNamespace reads the old generation, calls InvalidateNamespace, and
// reads the new one.
func bumpNamespace(ctx context.Context, rdb redis.UniversalClient, c *cacheaside.Cache[json.RawMessage], ns cacheaside.Namespace, res *invalidateResult) error {
	old, err := rdb.Get(ctx, res.GenerationKey).Bytes()
	switch {
	case err == nil:
		s := hex.EncodeToString(old)
		res.OldGeneration = &s
	case !errors.Is(err, redis.Nil):
		return err
	}
	if err := c.InvalidateNamespace(ctx, ns); err != nil {
		return err
	}
	cur, err := rdb.Get(ctx, res.GenerationKey).Bytes()
	if err != nil {
		return fmt.Errorf("the namespace was bumped, but reading its new generation failed: %w", err)
	}
	res.NewGeneration = hex.EncodeToString(cur)
	return nil
}

func printInvalidate(out io.Writer, res *invalidateResult) {
	w := termWriter{out}
	switch res.Op {
	case "key":
		fmt.Fprintf(w, "deleted %d of %s\n", *res.Deleted, keysWord(int64(len(res.Keys))))
	case "prefix":
		fmt.Fprintf(w, "deleted %s under %s\n", keysWord(*res.Deleted), strconv.Quote(res.Prefix))
	case "namespace":
		old := "none"
		if res.OldGeneration != nil {
			old = *res.OldGeneration
		}
		fmt.Fprintf(w, "namespace %s: generation %s -> %s\n", res.Namespace, old, res.NewGeneration)
	case "tag":
		fmt.Fprintf(w, "tags %s: new generations; every entry carrying one is a miss from now on\n", strings.Join(res.Tags, ", "))
	case "clear":
		fmt.Fprintf(w, "cleared: every entry of the cache is a miss from now on\n")
	}
	switch {
	case res.Refused != "":
		fmt.Fprintf(w, "not published: the server refuses SUBSCRIBE, so no process can hold a local tier to tell\n")
	case *res.Subscribers == 1:
		fmt.Fprintf(w, "published on %s to 1 subscriber\n", res.Channel)
	default:
		fmt.Fprintf(w, "published on %s to %d subscribers\n", res.Channel, *res.Subscribers)
	}
}

// subscribers counts the clients subscribed to channel, by classic and
// by sharded pub/sub: on the one server, or on every node of a Cluster (a
// subscriber may be on any of them), where the library subscribes by
// sharded pub/sub when the server has it (as channel behind wire.ShardTag)
// and by SUBSCRIBE otherwise.
func subscribers(ctx context.Context, rdb redis.UniversalClient, channel string) (classic, sharded int64, _ error) {
	count := func(ctx context.Context, c redis.Cmdable) (int64, error) {
		m, err := c.PubSubNumSub(ctx, channel).Result()
		return m[channel], err
	}
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		n, err := count(ctx, rdb)
		return n, 0, err
	}
	name := wire.ShardTag + channel
	var c, s atomic.Int64
	err := cc.ForEachShard(ctx, func(ctx context.Context, n *redis.Client) error {
		v, err := count(ctx, n)
		if err != nil {
			return err
		}
		c.Add(v)
		m, err := n.PubSubShardNumSub(ctx, name).Result()
		var re redis.Error
		if errors.As(err, &re) && (strings.Contains(strings.ToLower(err.Error()), "unknown") || strings.HasPrefix(err.Error(), "NOPERM")) {
			return nil // no sharded pub/sub on this server (or not for us to see): nobody subscribes that way
		}
		s.Add(m[name])
		return err
	})
	return c.Load(), s.Load(), err
}

// noTags is an Options.Tags for a command that invalidates tags, or nil.
func noTags(on bool) func(string) []string {
	if !on {
		return nil
	}
	return func(string) []string { return nil }
}

func keysWord(n int64) string {
	if n == 1 {
		return "1 key"
	}
	return strconv.FormatInt(n, 10) + " keys"
}

// parseNamespace turns a namespace's string form, as Namespace.String
// prints it ("v1:task_lists:{org:acme}"), or its generation key, back into
// the Namespace: it must be exactly what Keyspace.Namespace builds.
func parseNamespace(s string) (cacheaside.Namespace, error) {
	name, version, parts, err := wire.SplitNamespace(s)
	if err != nil {
		return cacheaside.Namespace{}, err
	}
	ks, err := cacheaside.NewKeyspace(name, version)
	if err != nil {
		return cacheaside.Namespace{}, fmt.Errorf("%q is not a namespace: %w", s, err)
	}
	ns := ks.Namespace(parts...)
	if tag := strings.TrimSuffix(s, wire.GenerationSuffix); ns.String() != tag {
		return cacheaside.Namespace{}, fmt.Errorf("%q is not a namespace: Keyspace.Namespace would spell it %q", s, ns.String())
	}
	return ns, nil
}
