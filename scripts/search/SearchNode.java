import org.codelibs.opensearch.runner.OpenSearchRunner;

/**
 * One OpenSearch node of the local stack, on loopback, with security off (the TLS and
 * auth tests keep their own HTTPS front). Arguments: DATA_DIR HTTP_PORT TRANSPORT_PORT.
 * The node keeps its data in DATA_DIR across restarts; it stops on SIGTERM.
 */
public final class SearchNode {
  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      System.err.println("usage: SearchNode DATA_DIR HTTP_PORT TRANSPORT_PORT");
      System.exit(2);
    }
    String dir = args[0];
    String http = args[1];
    String transport = args[2];
    OpenSearchRunner runner = new OpenSearchRunner();
    runner.onBuild((index, settings) -> {
      settings.put("network.host", "127.0.0.1");
      settings.put("http.port", http);
      // Fixed here: the runner's default (9300 + n) would collide between two stacks.
      settings.put("transport.port", transport);
      settings.put("discovery.type", "single-node");
      // A developer's disk may be fuller than the 85/90 % watermarks; one node has
      // nowhere else to put a shard, so the watermarks would only make indices read-only.
      settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
    });
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      try {
        runner.close();
      } catch (Exception e) {
        System.err.println("closing the node: " + e);
      }
    }));
    runner.build(OpenSearchRunner.newConfigs().basePath(dir).numOfNode(1)
        .clusterName("sluice").useLogger());
    runner.ensureYellow();
    System.out.println("search node ready on 127.0.0.1:" + http);
    Thread.currentThread().join();
  }
}
