// Readiness probe of the stack's Kafka broker: a real metadata request, not just an
// open port. Exits 0 once the broker answers with its cluster id and a controller,
// 1 when it has not within the given seconds.
//
//   java -cp 'libs/*' Ready.java HOST:PORT SECONDS [client.properties]
import java.io.FileInputStream;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.DescribeClusterOptions;

public class Ready {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        if (args.length > 2) {
            try (FileInputStream in = new FileInputStream(args[2])) {
                props.load(in);
            }
        }
        props.put("bootstrap.servers", args[0]);
        props.put("request.timeout.ms", "2000");
        props.put("default.api.timeout.ms", "2000");
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        String last = "no answer";
        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    var cluster = admin.describeCluster(new DescribeClusterOptions().timeoutMs(2000));
                    String id = cluster.clusterId().get(3, TimeUnit.SECONDS);
                    var controller = cluster.controller().get(3, TimeUnit.SECONDS);
                    if (id != null && controller != null && !controller.isEmpty()) {
                        System.out.println("kafka ready: cluster " + id + ", controller " + controller.id());
                        return;
                    }
                } catch (Exception e) {
                    last = e.getCause() != null ? e.getCause().toString() : e.toString();
                }
                Thread.sleep(200);
            }
        }
        System.err.println("kafka not ready at " + args[0] + ": " + last);
        System.exit(1);
    }
}
