// Command testall runs the tests of every module in this repository (the
// library, the reference app, the adapters under extra/), one module after
// another, goes on when one fails, and ends with one line per module. It
// exits 1 when any module failed. Tests always run (-count=1 unless a
// -count is given): a cached result says nothing about this machine. The
// randomized suites (consistency histories, Get-vs-GetMany schedules,
// staleness trials) run at a tenth of their size (-short) unless -full is
// given. Other arguments are passed to every `go test`, for example:
//
//	go run ./internal/testall            # what the README's test command runs
//	go run ./internal/testall -full      # the randomized suites at full size
//	go run ./internal/testall -race
//
// It needs nothing but Go: it runs from the repository's root, finds the
// modules by their go.mod files, and runs `go -C <module> test <args> ./...`
// with the go command on PATH, in its environment (so GOTOOLCHAIN applies).
package main

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"
)

func main() {
	root, err := repoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testall:", err)
		os.Exit(2)
	}
	mods, err := modules(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testall:", err)
		os.Exit(2)
	}
	args := os.Args[1:]
	flagSet := func(name string) bool {
		return slices.ContainsFunc(args, func(a string) bool {
			return strings.HasPrefix(a, "-"+name) || strings.HasPrefix(a, "--"+name)
		})
	}
	// -full: the randomized suites at their full size, as CI's full-size
	// step runs them; by default they run at a tenth (-short).
	full := slices.Contains(args, "-full")
	args = slices.DeleteFunc(args, func(a string) bool { return a == "-full" })
	if !full && !flagSet("short") {
		args = append([]string{"-short"}, args...)
	}
	// Run every test every time: a cached result says nothing about this
	// machine, and CI runs this command to rehearse a slow one.
	if !flagSet("count") {
		args = append([]string{"-count=1"}, args...)
	}
	type result struct {
		mod  string
		took time.Duration
		err  error
	}
	var results []result
	start := time.Now()
	for _, m := range mods {
		cmdArgs := append(append([]string{"-C", m, "test"}, args...), "./...")
		fmt.Printf("\n== %s: go %s\n", m, strings.Join(cmdArgs, " "))
		cmd := exec.Command("go", cmdArgs...) // the go on PATH, with this environment (GOTOOLCHAIN too)
		cmd.Dir = root
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		t0 := time.Now()
		err := cmd.Run()
		results = append(results, result{m, time.Since(t0), err})
	}
	fmt.Printf("\n== summary (%s, %s)\n", runtime.Version(), time.Since(start).Round(time.Second))
	failed := 0
	for _, r := range results {
		status := "ok  "
		if r.err != nil {
			status = "FAIL"
			failed++
		}
		line := fmt.Sprintf("%s  %-26s %8s", status, r.mod, r.took.Round(time.Second))
		if r.err != nil {
			line += "  (" + r.err.Error() + ")"
		}
		fmt.Println(line)
	}
	if failed > 0 {
		fmt.Printf("%d of %d modules failed\n", failed, len(results))
		os.Exit(1)
	}
}

// repoRoot is the directory of the go.mod of the module this command
// belongs to: the working directory or one above it.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && strings.HasPrefix(string(b), "module github.com/seed-b4ec662f/cacheaside\n") {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("run it inside the repository (no go.mod of github.com/seed-b4ec662f/cacheaside above %s)", dir)
		}
	}
}

// modules lists every module of the repository, relative to root: "."
// first, then the nested ones in path order. Hidden directories and
// testdata are skipped, as the go command skips them.
func modules(root string) ([]string, error) {
	var mods []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || strings.HasPrefix(d.Name(), "_") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && d.Name() == "go.mod" {
			rel, err := filepath.Rel(root, filepath.Dir(path))
			if err != nil {
				return err
			}
			mods = append(mods, filepath.ToSlash(rel))
		}
		return nil
	})
	sort.Slice(mods, func(i, j int) bool { return mods[i] == "." || (mods[j] != "." && mods[i] < mods[j]) })
	return mods, err
}
