// The cilium/ebpf consumer of `bpfring bench`: ringbuf.Reader on a map fd inherited from the
// benchmark, counting records and taking every n-th record's delivery latency, as the other
// consumers do. Built at run time (go build, GOPATH mode, against Debian's
// golang-github-cilium-ebpf-dev); it prints "ready", reads until stdin gets a line, then prints
// {"consumed": n, "latency_ns": [...]}.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fail("usage", fmt.Errorf("%s MAP_FD EVERY", os.Args[0]))
	}
	fd, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fail("map fd", err)
	}
	every, err := strconv.ParseUint(os.Args[2], 10, 64)
	if err != nil || every == 0 || every&(every-1) != 0 {
		fail("every (a power of two)", err)
	}
	m, err := ebpf.NewMapFromFD(fd)
	if err != nil {
		fail("can't use the ringbuf map fd", err)
	}
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		fail("can't create the ringbuf reader", err)
	}
	// The benchmark writes a line once the ring is drained: Close interrupts ReadInto.
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		rd.Close()
	}()
	fmt.Println("ready")

	var rec ringbuf.Record
	var count uint64
	var now unix.Timespec
	lat := make([]uint64, 0, 1<<16)
	for rd.ReadInto(&rec) == nil {
		count++
		if count&(every-1) != 0 || len(rec.RawSample) < 8 {
			continue
		}
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &now) // bpf_ktime_get_ns()'s clock
		lat = append(lat, uint64(now.Nano())-binary.LittleEndian.Uint64(rec.RawSample))
	}
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{"consumed": count, "latency_ns": lat})
}
