// noop-extproc: the cheapest possible ext_proc, for `make bench-gateway`.
//
// It answers every request body with the routing metadata of one fixed backend, lets every
// response chunk pass, and does nothing else: no parsing, no scoring, no accounting. Envoy in front of it shows what Envoy's own ext_proc
// machinery costs, the floor any external processor (ours included) sits on.
//
// Usage: noop-extproc SOCKET METADATA_NAMESPACE BACKEND_KEY
package main

import (
	"net"
	"os"

	extproc "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
)

type server struct {
	extproc.UnimplementedExternalProcessorServer
	reply *extproc.ProcessingResponse
}

// Each response chunk (the gateway streams them to its ext_proc for usage accounting) passes
// unchanged: a reply of the wrong kind would be a protocol error that ends the stream early.
var pass = &extproc.ProcessingResponse{
	Response: &extproc.ProcessingResponse_ResponseBody{ResponseBody: &extproc.BodyResponse{}},
}

func (s *server) Process(stream extproc.ExternalProcessor_ProcessServer) error {
	for {
		request, err := stream.Recv()
		if err != nil {
			return nil
		}
		reply := s.reply
		if request.GetResponseBody() != nil {
			reply = pass
		}
		if err := stream.Send(reply); err != nil {
			return err
		}
	}
}

func main() {
	if len(os.Args) != 4 {
		os.Stderr.WriteString("usage: noop-extproc SOCKET METADATA_NAMESPACE BACKEND_KEY\n")
		os.Exit(2)
	}
	socket, namespace, backend := os.Args[1], os.Args[2], os.Args[3]
	meta, err := structpb.NewStruct(map[string]any{
		namespace: map[string]any{"backend": backend, "policy": "noop", "reason": "noop"},
	})
	if err != nil {
		panic(err)
	}
	// Same shape as Switchyard's reply: clear the route cache, and an empty header mutation
	// so that Envoy re-matches the route on the new metadata.
	reply := &extproc.ProcessingResponse{
		Response: &extproc.ProcessingResponse_RequestBody{RequestBody: &extproc.BodyResponse{
			Response: &extproc.CommonResponse{
				ClearRouteCache: true,
				HeaderMutation:  &extproc.HeaderMutation{},
			},
		}},
		DynamicMetadata: meta,
	}
	os.Remove(socket)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		panic(err)
	}
	grpcServer := grpc.NewServer()
	extproc.RegisterExternalProcessorServer(grpcServer, &server{reply: reply})
	if err := grpcServer.Serve(listener); err != nil {
		panic(err)
	}
}
